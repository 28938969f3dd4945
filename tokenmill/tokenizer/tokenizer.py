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
  tokens written in the text itself (``<|im_start|>``) are always recognised as single tokens.
* ``eos_token_ids`` is every id that ends generation: the tokenizer's EOS plus the
  ``eos_token_id`` of ``generation_config.json`` and ``config.json`` (an int or a list), e.g.
  both ``<|end_of_text|>`` and ``<|eot_id|>`` for Llama 3 Instruct.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from tokenmill.tokenizer.chat_template import render_chat_template, template_variables

__all__ = ["Tokenizer"]

logger = logging.getLogger(__name__)


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
        """Token ids of ``text``; BOS/EOS are added only if the model's config asks for them."""
        if not self._explicit_special:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self.bos_token_id)
            if self._add_eos:
                ids.append(self.eos_token_id)
        return ids

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
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``conversation`` (``[{"role": ..., "content": ...}, ...]``) into a prompt string.

        The template also sees ``bos_token``/``eos_token``/``unk_token``/``pad_token`` and any
        ``kwargs`` (e.g. ``enable_thinking=False``). Encode the result with
        ``add_special_tokens=False``: templates write BOS themselves when the model needs it.
        """
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata); send a plain completion prompt instead"
            )
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
            **{**special, **kwargs},
        )

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
