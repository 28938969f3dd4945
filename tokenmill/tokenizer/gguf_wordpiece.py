"""WordPiece (BERT) tokenizers from GGUF metadata (``tokenizer.ggml.model == "bert"``).

llama.cpp's converter rewrites the BERT vocabulary before storing it: a word-initial piece
``"hello"`` is stored as ``"▁hello"`` and a continuation piece ``"##llo"`` as ``"llo"``. Special
tokens (``[CLS]``, ``[SEP]``, ...) and ``[unusedN]`` placeholders are stored unchanged. We undo the
rewrite so that the ``tokenizers`` WordPiece model (continuations marked ``##``) sees the original
vocabulary, ids unchanged.

The algorithm (same as BERT's and llama.cpp's WPM): the text is normalized (control characters
removed, CJK ideographs spaced out, optionally lowercased and accent-stripped: NFD, then drop
combining marks), split at whitespace and around every punctuation character, and each word is
cut greedily into the longest vocabulary piece from the left, then the longest ``##`` piece, ...;
a word that cannot be covered entirely becomes ``[UNK]``.

Normalization options come from ``tokenizer.ggml.normalizer.lowercase`` (default true) and
``tokenizer.ggml.normalizer.strip_accents`` (default: as lowercase), llama.cpp's defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["build_wordpiece", "wordpiece_vocab"]

_WORD_START = "▁"
_PLACEHOLDER = re.compile(r"\[unused\d+\]")


def wordpiece_vocab(tokens: Sequence[str], types: Sequence[int]) -> dict[str, int]:
    """The original BERT spelling of llama.cpp's stored vocabulary, as ``{piece: id}``."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        kind = types[i] if i < len(types) else TokenType.NORMAL
        if tok.startswith(_WORD_START) and len(tok) > 1:
            piece = tok[len(_WORD_START):]
        elif kind in (TokenType.CONTROL, TokenType.UNKNOWN) or _PLACEHOLDER.fullmatch(tok):
            piece = tok
        else:
            piece = "##" + tok
        vocab.setdefault(piece, i)
    return vocab


def build_wordpiece(meta: Mapping[str, Any], tokens: list[str]) -> HFTokenizer:
    """A ``tokenizers`` WordPiece tokenizer equivalent to the GGUF's BERT tokenizer."""
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None or not 0 <= unk_id < len(tokens):
        raise ValueError("GGUF 'bert' tokenizer has no valid tokenizer.ggml.unknown_token_id")
    lowercase = bool(meta.get("tokenizer.ggml.normalizer.lowercase", True))
    strip_accents = bool(meta.get("tokenizer.ggml.normalizer.strip_accents", lowercase))
    backend = HFTokenizer(
        models.WordPiece(
            vocab=wordpiece_vocab(tokens, types),
            unk_token=tokens[unk_id],
            continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        )
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    special = [
        tok for tok, kind in zip(tokens, types, strict=False)
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
    ]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return backend
