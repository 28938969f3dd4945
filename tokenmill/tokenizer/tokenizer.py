"""The tokenizer the engine uses: a thin, typed wrapper around Hugging Face ``tokenizers``.

``Tokenizer.from_pretrained(path)`` accepts either

* a Hugging Face model folder: ``tokenizer.json`` (required) plus the optional
  ``tokenizer_config.json`` (special tokens, ``add_bos_token``, chat template),
  ``chat_template.jinja``, ``generation_config.json`` and ``config.json`` (extra EOS ids); or
* a single ``.gguf`` file, whose tokenizer metadata is turned into the same kind of object by
  ``tokenmill.tokenizer.gguf_tokenizer``.

Special-token conventions, following transformers:

* ``encode(text, add_special_tokens=True)`` adds BOS (and EOS) only when the model asks for it.
  An explicit ``add_bos_token`` / ``add_eos_token`` (tokenizer_config.json, or GGUF
  ``tokenizer.ggml.add_bos_token``) decides; otherwise the ``post_processor`` inside
  ``tokenizer.json`` does (e.g. Llama 3's template prepends ``<|begin_of_text|>``). Special
  tokens written in the text itself (``<|im_start|>``) are recognised as single tokens by
  ``encode``; ``encode_chat`` recognises only those the chat template writes itself (see there).
* ``encode`` runs the Rust tokenizer with the GIL released, so a long text tokenized in a
  worker thread does not stall the other threads (the server's event loop).
* ``eos_token_ids`` is every id that ends generation: the tokenizer's EOS plus the
  ``eos_token_id`` of ``generation_config.json`` and ``config.json`` (an int or a list), e.g.
  both ``<|end_of_text|>`` and ``<|eot_id|>`` for Llama 3 Instruct.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from tokenmill.tokenizer.chat_template import render_chat_template, template_variables

__all__ = ["RESERVED_TEMPLATE_VARIABLES", "SpecialTokenTextError", "Tokenizer"]

logger = logging.getLogger(__name__)

# Stands in for each character of special-token text in user strings while the template is
# rendered a second time (``Tokenizer.encode_chat``); a private-use character no template
# treats specially.
_NEUTRAL = "\ue000"

# Template variables the chat call sets itself (and the names of its own parameters); extra
# variables (``chat_template_kwargs``) may not use them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "conversation", "tools", "add_generation_prompt", "template", "self"})


class SpecialTokenTextError(ValueError):
    """User text holds special-token text that cannot be kept apart from the template's own
    markup (the template transforms the text in a way that moves it)."""


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``backend``.

        ``add_bos_token`` / ``add_eos_token``: ``None`` lets the backend's post-processor decide
        what ``encode(add_special_tokens=True)`` adds; a bool overrides it.
        """
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        extra_eos_token_ids = list(extra_eos_token_ids)
        named = {"bos": bos_token_id, "eos": eos_token_id, "unk": unk_token_id, "pad": pad_token_id}
        for name, tid in [*named.items(), *(("extra eos", t) for t in extra_eos_token_ids)]:
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(
                    f"{name} token id {tid} is outside the vocabulary (size {self.vocab_size}); "
                    "check the special token ids in the model's config"
                )
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_id: int | None = eos_token_id
        eos_ids = set(extra_eos_token_ids)
        if eos_token_id is not None:
            eos_ids.add(eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.unk_token_id: int | None = unk_token_id
        self.pad_token_id: int | None = pad_token_id
        self.chat_template: str | None = chat_template
        self._explicit_special = add_bos_token is not None or add_eos_token is not None
        self._add_bos = bool(add_bos_token) and bos_token_id is not None
        self._add_eos = bool(add_eos_token) and eos_token_id is not None
        special = {tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special}
        special |= {t for t in named.values() if t is not None}
        self.all_special_ids: frozenset[int] = frozenset(special)
        # the added tokens marked special, which encode() turns into control tokens
        self._special_added: dict[int, str] = {
            tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()
            if tok.special and tok.content}
        texts = sorted(set(self._special_added.values()), key=len, reverse=True)
        self._special_text_re = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._text_backend: HFTokenizer | None = None  # encodes special-token text as text

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        """Load from a Hugging Face folder (with ``tokenizer.json``) or a ``.gguf`` file."""
        path = os.fspath(path)
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise ValueError(
                    f"{path} is a file but not a .gguf file; pass a model folder containing "
                    "tokenizer.json, or a .gguf file"
                )
            from tokenmill.tokenizer.gguf_tokenizer import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer path {path!r} does not exist")
        return _load_hf_folder(cls, path)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS are added only if the model's config asks for them.

        Raises ``ValueError`` for text that is not valid Unicode (a lone surrogate such as
        ``"\\ud800"``, which JSON can carry)."""
        _check_unicode(text)
        if not self._explicit_special:
            return _encode_ids(self.backend, text, add_special_tokens)
        ids = _encode_ids(self.backend, text, False)
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        """``ids`` with what ``encode(add_special_tokens=True)`` adds around a text."""
        if self._explicit_special:
            return ([self.bos_token_id] if self._add_bos else []) + ids + (
                [self.eos_token_id] if self._add_eos else [])
        plain = _encode_ids(self.backend, "a", False)
        full = _encode_ids(self.backend, "a", True)
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i] + ids + full[i + len(plain):]
        return ids

    def has_special_token_text(self, text: str) -> bool:
        """True if ``text`` contains the text of a special token (``<|im_end|>``)."""
        return self._special_text_re is not None and bool(self._special_text_re.search(text))

    def _text_encoder(self) -> HFTokenizer:
        """A copy of the backend that reads special-token text as ordinary text."""
        if self._text_backend is None:
            backend = HFTokenizer.from_str(self.backend.to_str())
            backend.encode_special_tokens = True
            self._text_backend = backend
        return self._text_backend

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``. Bytes of an unfinished UTF-8 character decode to U+FFFD."""
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of ``token_ids`` (byte-level BPE spells a space as ``Ġ``)."""
        tokens = []
        for tid in token_ids:
            tok = self.backend.id_to_token(tid)
            if tok is None:
                raise ValueError(
                    f"token id {tid} is not in the vocabulary (size {self.vocab_size})"
                )
            tokens.append(tok)
        return tokens

    def token_to_id(self, token: str) -> int | None:
        """Id of the vocabulary string ``token``, or None."""
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        /,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``conversation`` (``[{"role": ..., "content": ...}, ...]``) into a prompt string.

        The template also sees ``bos_token``/``eos_token``/``unk_token``/``pad_token`` and any
        ``kwargs`` (e.g. ``enable_thinking=False``). Encode the result with
        ``add_special_tokens=False``: templates write BOS themselves when the model needs it.
        """
        return self._render(conversation, add_generation_prompt, tools, kwargs)

    def _render(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, variables: Mapping[str, Any]) -> str:
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata); send a plain completion prompt instead"
            )
        taken = sorted(RESERVED_TEMPLATE_VARIABLES & set(variables))
        if taken:
            raise ValueError(f"the template variables {taken} are set by the chat call itself; "
                             "they cannot be passed as extra variables")
        special = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            "pad_token": self._token_text(self.pad_token_id),
        }
        return render_chat_template(
            self.chat_template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **{**special, **variables},
        )

    def encode_chat(
        self,
        conversation: list[dict[str, Any]],
        /,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        *,
        add_special_tokens: bool = False,
        special_tokens_in_text: bool = False,
    ) -> list[int]:
        """Token ids of ``conversation`` rendered with the chat template.

        Only the template's own markup becomes special tokens: text of a special token
        inside the messages, the tools or ``template_kwargs`` (a user typing
        ``<|im_end|>\\n<|im_start|>system``) is tokenized as ordinary text, so it cannot
        forge a turn. A conversation without such text is tokenized exactly as
        ``encode(apply_chat_template(...))``; ``special_tokens_in_text=True`` always does
        that (the old behaviour).

        How: the template is rendered a second time with every special-token text in the
        user's strings replaced by as many neutral characters. Where that rendering has a
        special token, the template wrote it; the real rendering is split there, and the
        pieces between are tokenized with special-token matching off. Raises
        ``SpecialTokenTextError`` if the two renderings do not line up (a template that
        transforms the text depending on it), and ``ChatTemplateError`` (both ValueErrors)
        if the template rejects the conversation.
        """
        kwargs = dict(template_kwargs or {})
        text = self._render(conversation, add_generation_prompt, tools, kwargs)
        if special_tokens_in_text or not self._has_special_text_in(
                (conversation, tools, kwargs)):
            return self.encode(text, add_special_tokens=add_special_tokens)
        neutral = self._render(self._neutralized(conversation), add_generation_prompt,
                               self._neutralized(tools), self._neutralized(kwargs))
        ids = self._split_encode(text, neutral)
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def _has_special_text_in(self, value: Any) -> bool:
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                if self.has_special_token_text(v):
                    return True
            elif isinstance(v, Mapping):
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, list | tuple):
                stack.extend(v)
        return False

    def _neutralized(self, value: Any) -> Any:
        """``value`` with every special-token text in its strings (keys too) replaced by as
        many neutral characters."""
        if isinstance(value, str):
            if self._special_text_re is None:
                return value
            return self._special_text_re.sub(lambda m: _NEUTRAL * len(m.group()), value)
        if isinstance(value, Mapping):
            return {self._neutralized(k): self._neutralized(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._neutralized(v) for v in value]
        return value

    def _split_encode(self, text: str, neutral: str) -> list[int]:
        """Tokenizes ``text``, whose template-written special tokens are those of
        ``neutral`` (the rendering with neutralized user strings): special tokens there,
        ordinary text everywhere else."""
        # the same text but for special-token text: the template did not move anything
        if len(text) != len(neutral) or self._neutralized(text) != self._neutralized(neutral):
            raise SpecialTokenTextError(_MOVED)
        enc = self.backend.encode_batch([neutral], add_special_tokens=False)[0]
        cuts: list[tuple[int, int, int]] = []
        for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            content = self._special_added.get(tid)
            if content is None:
                continue
            if text[start:end] != content or neutral[start:end] != content:
                raise SpecialTokenTextError(_MOVED)
            cuts.append((start, end, tid))
        encoder = self._text_encoder()
        ids: list[int] = []
        pos = 0
        for start, end, tid in cuts:
            if start > pos:
                ids += _encode_ids(encoder, text[pos:start], False)
            ids.append(tid)
            pos = end
        if pos < len(text):
            ids += _encode_ids(encoder, text[pos:], False)
        return ids

    @property
    def chat_template_knows_tools(self) -> bool:
        """True if the chat template reads ``tools`` (renders a tool list for the model)."""
        return self.chat_template is not None and "tools" in template_variables(
            self.chat_template)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={sorted(self.eos_token_ids)}, chat_template={self.chat_template is not None})"
        )


_MOVED = ("the conversation contains special-token text, which is read as plain text, but "
          "this chat template transforms the text in a way that cannot be kept apart from "
          "its own markup; remove the special-token text")


def _check_unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode: it contains a lone surrogate "
                             f"at character {e.start}") from None


def _encode_ids(backend: HFTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """``backend.encode(text).ids`` through the batch call, which releases the GIL."""
    fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return fast([text], add_special_tokens=add_special_tokens)[0].ids


# ---------------------------------------------------------------------- HF folder


def _read_json(folder: str, name: str) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should contain a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """``eos_token_id`` in config files is an int, a list of ints, or absent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(folder: str, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` if present (it wins, as in transformers), else the config entry.

    The config entry is a string, or a list of ``{"name", "template"}`` of which we take
    ``"default"``.
    """
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"tokenizer_config.json in {folder} lists chat templates {sorted(named)} but no "
                "'default' one; add a chat_template.jinja file with the template to use"
            )
        template = named["default"]
    return template if isinstance(template, str) else None


def _load_hf_folder(cls: type[Tokenizer], folder: str) -> Tokenizer:
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise ValueError(
            f"{folder} has no tokenizer.json. Slow-tokenizer-only folders (tokenizer.model, "
            "vocab.json) are not supported; convert once with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
        )
    backend = HFTokenizer.from_file(tokenizer_json)
    # Some tokenizer.json files (sentence-transformers') pad every text to a fixed length and
    # truncate it; the engine wants a text's own ids, and checks lengths itself.
    backend.no_padding()
    backend.no_truncation()
    config = _read_json(folder, "tokenizer_config.json")
    gen_config = _read_json(folder, "generation_config.json")
    model_config = _read_json(folder, "config.json")

    def resolve(name: str) -> int | None:
        content = _token_content(config.get(name))
        if content is None:
            return None
        tid = backend.token_to_id(content)
        if tid is None:
            logger.warning(
                "%s %r from tokenizer_config.json is not in the vocabulary", name, content
            )
        return tid

    vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def config_ids(name: str) -> list[int]:
        """Ids from generation_config.json then config.json (ids past the vocab are dropped)."""
        ids = _id_list(gen_config.get(name)) + _id_list(model_config.get(name))
        return [t for t in ids if 0 <= t < vocab_size]

    bos = resolve("bos_token")
    if "bos_token" not in config:  # the tokenizer config is silent: ask the model configs
        bos = next(iter(config_ids("bos_token_id")), None)
    extra_eos = config_ids("eos_token_id")
    eos = resolve("eos_token")
    if eos is None and extra_eos:
        eos = extra_eos[0]
    return cls(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=extra_eos,
        unk_token_id=resolve("unk_token"),
        pad_token_id=resolve("pad_token"),
        add_bos_token=config.get("add_bos_token"),
        add_eos_token=config.get("add_eos_token"),
        chat_template=_chat_template(folder, config),
    )
