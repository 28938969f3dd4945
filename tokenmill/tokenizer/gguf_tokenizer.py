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
from tokenmill.tokenizer.gguf_wordpiece import build_wordpiece
from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["UnsupportedTokenizerError", "load_gguf_tokenizer", "tokenizer_from_gguf_metadata"]

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
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# Pre-tokenizers that are a chain of regex splits (each cutting the pieces of the previous one,
# matches and the text between kept), then byte-level spelling; as in the models' tokenizer.json.
_SPLIT_CHAINS: dict[str, tuple[str, ...]] = {
    "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,), "llama-bpe": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,), "dbrx": (_LLAMA3_SPLIT,), "falcon3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,), "deepseek-r1-qwen": (_QWEN2_SPLIT,), "megrez": (_QWEN2_SPLIT,),
    "qwen35": (_QWEN35_SPLIT,),
    "default": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,), "gpt-2": (_GPT2_SPLIT,),
    "olmo": (_GPT2_SPLIT,), "jais": (_GPT2_SPLIT,),
    # individual digits first (SmolLM, StarCoder, Command-R, ...)
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva"), (r"\p{N}", _GPT2_SPLIT)),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-llm": (
        r"[\r\n]",
        (
            "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
            "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
            "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0"
            "-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-"
            "\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
            "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-"
            "\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
            "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
            "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
            "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00"
            "-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-"
            "\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-"
            "\U000118df\U0001e900-\U0001e943]+"
        ),
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ),
}
# Vocabularies whose original tokenizer NFC-normalizes the text first.
_NFC_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}
# Llama 3 looks whole pre-tokenized words up in the vocabulary before merging.
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}


class UnsupportedTokenizerError(ValueError):
    """The GGUF's tokenizer model or pre-tokenizer is one tokenmill cannot reproduce."""


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
    chain = _SPLIT_CHAINS.get(pre)
    if chain is None:
        raise UnsupportedTokenizerError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre, byte-level BPE model 'gpt2') is "
            "not supported: tokenmill does not know its splitting rules, and guessing would "
            f"silently change token ids. Supported: {', '.join(sorted(_SPLIT_CHAINS))}. Load "
            "the tokenizer from the model's Hugging Face folder instead")
    pre_tok = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in chain]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    normalizer = normalizers.NFC() if pre in _NFC_PRE else None
    return pre_tok, normalizer, pre in _IGNORE_MERGES_PRE


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


def _sentencepiece_merges(
    tokens: list[str], scores: list[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the vocabulary
    token with the highest score. Every split of a token into two vocabulary pieces is therefore
    a merge whose priority is that token's score (ties: by the pieces' ids). The loop is the
    slow part of loading a 262k vocabulary (Gemma 3), hence ids, not strings, in the sort.
    """
    get = vocab.get
    merges: list[tuple[float, int, int]] = []
    append = merges.append
    for tok, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(tok)):
            left = get(tok[:cut])
            if left is not None:
                right = get(tok[cut:])
                if right is not None:
                    append((-score, left, right))
    merges.sort()
    return [(tokens[left], tokens[right]) for _, left, right in merges]


def _build_sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], *, split_newlines: bool = False
) -> HFTokenizer:
    """SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``, e.g. Llama 2, Mistral v1,
    Gemma 3; ``"gemma4"``).

    Spaces are written ``▁``; with ``add_space_prefix`` a ``▁`` is prepended to each piece of
    text (also after a special token, as llama.cpp does), and decoding removes it again
    (``Strip``). Characters missing from the vocabulary fall back to byte tokens ``<0xNN>``.
    ``split_newlines`` (Gemma 4) cuts the text into runs of newlines and runs of other
    characters before merging, and a run of newlines that is a token is taken whole.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _parse_merges(meta["tokenizer.ggml.merges"])
    elif "tokenizer.ggml.scores" in meta:
        merges = _sentencepiece_merges(tokens, meta["tokenizer.ggml.scores"], vocab)
    else:
        raise ValueError("GGUF 'llama' tokenizer has neither merges nor scores; cannot build BPE")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                   ignore_merges=split_newlines)
    )
    if split_newlines:
        backend.pre_tokenizer = pre_tokenizers.Split(
            Regex("[^\n]+|[\n]+"), behavior="isolated", invert=False)
    # Every space becomes "▁" and, with add_space_prefix, one "▁" is prepended even when the
    # text starts with a space (" Hello" -> "▁▁Hello"), as SentencePiece does; the whole text
    # is one BPE word (no pre-tokenizer), so runs of spaces merge into "▁▁▁" pieces.
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
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
    elif kind == "gemma4":
        backend = _build_sentencepiece_bpe(meta, tokens, split_newlines=True)
    elif kind == "bert":
        backend = build_wordpiece(meta, tokens)
    else:
        raise UnsupportedTokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported (tokenizer.ggml.model; "
            f"pre-tokenizer {meta.get('tokenizer.ggml.pre')!r}); supported are 'gpt2' "
            "(byte-level BPE), 'llama' (SentencePiece BPE) and 'bert' (WordPiece). Load the "
            "tokenizer from the model's Hugging Face folder instead"
        )

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is None:
            return None
        if not 0 <= value < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{name} = {value} is outside the vocabulary")
        return int(value)

    eos = token_id("eos_token_id")
    bos = token_id("bos_token_id")
    if kind == "bert":  # BERT wraps a text as [CLS] ... [SEP]; llama.cpp's WPM does the same
        bos = bos if bos is not None else token_id("cls_token_id")
        eos = eos if eos is not None else token_id("seperator_token_id")
    end_of_turn = [t for t in (token_id("eot_token_id"), token_id("eom_token_id")) if t is not None]
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind in ("llama", "gemma4", "bert"))
    add_eos = meta.get("tokenizer.ggml.add_eos_token", kind == "bert")
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=end_of_turn,
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """Read the tokenizer stored in the GGUF file at ``path``."""
    return tokenizer_from_gguf_metadata(read_gguf_metadata(path))
