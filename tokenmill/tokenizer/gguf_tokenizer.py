"""Building a tokenizer from the metadata of a GGUF file.

A GGUF file carries no ``tokenizer.json``; llama.cpp stores the tokenizer as metadata instead:

* ``tokenizer.ggml.model``: the algorithm. ``"gpt2"`` is byte-level BPE (GPT-2, Llama 3, Qwen2,
  SmolLM, ...); ``"llama"`` is SentencePiece-style BPE with per-token scores (Llama 2, Mistral v1).
* ``tokenizer.ggml.tokens`` (the vocabulary, index = id), ``tokenizer.ggml.merges`` (BPE merge
  rules ``"left right"`` in priority order), ``tokenizer.ggml.scores`` (SentencePiece scores).
* ``tokenizer.ggml.token_type`` per token: 1 normal, 2 unknown, 3 control, 4 user-defined,
  5 unused, 6 byte. Control (and unknown) tokens become *special* added tokens: matched whole in
  the input and dropped by ``decode(skip_special_tokens=True)``. User-defined tokens become
  non-special added tokens (matched whole, always decoded).
* ``tokenizer.ggml.pre``: names the pre-tokenizer, i.e. the regex that cuts text into words
  before BPE runs inside each word. BPE merges were learned on words cut this way, so picking
  the wrong regex silently changes token ids.
* special ids (``bos_token_id``, ``eos_token_id``, ``eot_token_id``, ...), ``add_bos_token``,
  ``add_space_prefix`` and ``tokenizer.chat_template``.

From these we assemble a ``tokenizers.Tokenizer`` equivalent to the model's original HF tokenizer
(the same construction transformers' GGUF integration performs). If the file embeds the original
``tokenizer.huggingface.json`` we use that directly.

Metadata is parsed by ``tokenmill.gguf.reader.read_gguf_metadata``, the same fast reader
the weight loader uses (``gguf.GGUFReader`` needs ~6 s for a 49k-token vocabulary).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tokenmill.gguf.reader import read_gguf_metadata
from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["load_gguf_tokenizer", "tokenizer_from_gguf_metadata"]

logger = logging.getLogger(__name__)

# Pre-tokenizer regexes, keyed by `tokenizer.ggml.pre` (llama.cpp's names for them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo", "codeshell"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    code points 256 and up, so that every byte string is spelled with visible characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, Any, bool]:
    """(pre_tokenizer, normalizer, ignore_merges) for a byte-level BPE vocabulary."""
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # Qwen2's original tokenizer NFC-normalizes; Llama 3 looks whole words up first.
        normalizer = normalizers.NFC() if pre in _QWEN2_PRE else None
        return pre_tok, normalizer, pre in _LLAMA3_PRE
    if pre not in _GPT2_PRE:
        logger.warning(
            "GGUF pre-tokenizer %r is not known to tokenmill; using the GPT-2 regex, which may "
            "tokenize some text differently from the original model",
            pre,
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None, False


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed GGUF merge rule {merge!r}: expected 'left right'")
        pairs.append((parts[0], parts[1]))
    return pairs


def _build_byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> HFTokenizer:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``).

    Tokens are stored spelled in GPT-2's byte alphabet (``"Ġthe"`` for ``" the"``). A few
    converters store some tokens as raw text instead; those are re-spelled byte by byte so the
    merges can find them.
    """
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = _parse_merges(meta.get("tokenizer.ggml.merges", []))
    pre_tok, normalizer, ignore_merges = _byte_level_pre_tokenizer(
        meta.get("tokenizer.ggml.pre", "default")
    )
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
    )
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    # Control/user-defined tokens spelled outside the byte alphabet are mislabelled ordinary
    # tokens (adding them would create new ids), so only whole-alphabet ones are added.
    _add_typed_tokens(backend, meta, tokens, lambda tok: tok in vocab and set(tok) <= alphabet)
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the vocabulary
    token with the highest score. Every split of a token into two vocabulary pieces is therefore
    a merge whose priority is that token's score (ties: by the pieces' ids).
    """
    ids = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for tok, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _build_sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str]) -> HFTokenizer:
    """SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``, e.g. Llama 2, Mistral v1).

    Words are marked with ``▁`` instead of a space (``Metaspace``); a ``▁`` is prepended to the
    text when ``add_space_prefix`` is set, and decoding removes it again (``Strip``). Characters
    missing from the vocabulary fall back to byte tokens ``<0xNN>``.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _parse_merges(meta["tokenizer.ggml.merges"])
    elif "tokenizer.ggml.scores" in meta:
        merges = _sentencepiece_merges(tokens, meta["tokenizer.ggml.scores"])
    else:
        raise ValueError("GGUF 'llama' tokenizer has neither merges nor scores; cannot build BPE")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_typed_tokens(backend, meta, tokens, lambda tok: True)
    return backend


def _add_typed_tokens(
    backend: HFTokenizer,
    meta: Mapping[str, Any],
    tokens: list[str],
    ok: Callable[[str], bool],
) -> None:
    """Register control/unknown tokens as special and user-defined ones as plain added tokens.

    ``ok(token)`` filters out tokens that must not be added (see the byte-level builder).
    """
    types = meta.get("tokenizer.ggml.token_type") or []
    special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
    special = [t for t, k in zip(tokens, types, strict=False) if k in special_types and ok(t)]
    user = [t for t, k in zip(tokens, types, strict=False) if k == TokenType.USER_DEFINED and ok(t)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """Build a ``Tokenizer`` from GGUF metadata (as returned by ``read_gguf_metadata``)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(
            "this GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens); "
            "load the tokenizer from the model's Hugging Face folder instead"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    if "tokenizer.huggingface.json" in meta:
        backend = HFTokenizer.from_str(meta["tokenizer.huggingface.json"])
    elif kind == "gpt2":
        backend = _build_byte_level_bpe(meta, tokens)
    elif kind == "llama":
        backend = _build_sentencepiece_bpe(meta, tokens)
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; supported are 'gpt2' (byte-level "
            "BPE) and 'llama' (SentencePiece BPE). Load the tokenizer from the model's Hugging "
            "Face folder instead"
        )

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is None:
            return None
        if not 0 <= value < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{name} = {value} is outside the vocabulary")
        return int(value)

    eos = token_id("eos_token_id")
    end_of_turn = [t for t in (token_id("eot_token_id"), token_id("eom_token_id")) if t is not None]
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer(
        backend,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=eos,
        extra_eos_token_ids=end_of_turn,
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """Read the tokenizer stored in the GGUF file at ``path``."""
    return tokenizer_from_gguf_metadata(read_gguf_metadata(path))
