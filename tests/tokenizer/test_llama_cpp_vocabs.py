"""Our GGUF tokenizers against llama.cpp's vocabulary tests (test-tokenizer-0).

The files come from the llama-cpp-python sdist on PyPI, fetched once into the models cache by
``tokenmill.loader.llama_cpp_vocabs`` (see there). Each ``ggml-vocab-NAME.gguf`` is a real
model's tokenizer; its ``.inp``/``.out`` files pair texts with the ids the model's original
tokenizer gives them, encoded as llama.cpp's test does: no BOS/EOS, special-token text read as
plain text. Every vocabulary there is either supported (every line must match) or refused at
load with an error naming its tokenizer model and pre-tokenizer.
"""

from __future__ import annotations

import itertools

import pytest

from tokenmill.gguf.reader import read_gguf_metadata
from tokenmill.loader import llama_cpp_vocabs
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.gguf_tokenizer import (
    UnsupportedTokenizerError,
    tokenizer_from_gguf_metadata,
)

SUPPORTED = (
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
    "llama-bpe", "llama-spm", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
)
# (tokenizer.ggml.model, tokenizer.ggml.pre) the error must name
UNSUPPORTED = {"mpt": ("gpt2", "mpt")}
# WordPiece lowercases and drops accents and spacing: its ids do not decode to the text.
NO_ROUND_TRIP = {"bert-bge"}


@pytest.fixture(scope="module")
def vocabs():
    try:
        return llama_cpp_vocabs.vocab_dir()
    except llama_cpp_vocabs.ModelFetchError as exc:  # no PyPI: nothing to check against
        pytest.skip(f"llama.cpp vocab files unavailable: {exc}")


def _load(vocabs, name: str):
    test = llama_cpp_vocabs.read_vocab_test(vocabs, name)
    return test, tokenizer_from_gguf_metadata(read_gguf_metadata(str(test.gguf)))


def test_every_vocab_in_the_sdist_is_classified(vocabs):
    assert set(llama_cpp_vocabs.list_vocabs(vocabs)) == set(SUPPORTED) | set(UNSUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
def test_ids_match_llama_cpp(vocabs, name):
    test, tok = _load(vocabs, name)
    assert len(test.cases) >= 40
    text_encoder = tok.backend
    text_encoder.encode_special_tokens = True  # special-token text is text in llama.cpp's test
    wrong = []
    for text, expected in test.cases:
        got = tuple(text_encoder.encode(text, add_special_tokens=False).ids)
        if got != expected:
            wrong.append((text, expected, got))
        elif name not in NO_ROUND_TRIP:
            assert tok.decode(list(expected), skip_special_tokens=False) == text
            assert _streamed(tok, expected) == text
    assert not wrong, f"{len(wrong)} of {len(test.cases)} lines differ, first: {wrong[0]}"


def _streamed(tok, ids) -> str:
    """The text the incremental detokenizer emits token by token (byte-fallback and
    byte-level pieces of one character arrive in several tokens)."""
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    pieces, seen = [], ""
    for tid in ids:
        detok.add_token(tid)
        now = detok.text(finished=False)
        assert now.startswith(seen) and "\ufffd" not in now[len(seen):]
        pieces.append(now[len(seen):])
        seen = now
    return "".join(pieces) + detok.text(finished=True)[len(seen):]


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_vocab_is_refused_by_name(vocabs, name):
    model, pre = UNSUPPORTED[name]
    meta = read_gguf_metadata(str(vocabs / f"ggml-vocab-{name}.gguf"))
    with pytest.raises(UnsupportedTokenizerError) as err:
        tokenizer_from_gguf_metadata(meta)
    assert repr(model) in str(err.value)
    if pre is not None:
        assert repr(pre) in str(err.value)


def test_wordpiece_wraps_text_in_cls_and_sep(vocabs):
    _, tok = _load(vocabs, "bert-bge")
    ids = tok.encode("Hello, world!")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert (ids[0], ids[-1]) == (cls_id, sep_id)
    assert tok.encode("Hello, world!", add_special_tokens=False) == ids[1:-1]
    assert tok.decode(ids) == "hello, world!"


@pytest.mark.slow
def test_nomic_embed_gguf_wordpiece_matches_its_hf_tokenizer():
    """nomic-embed-text-v1.5 (GGUF, nomic-bert) and all-MiniLM-L6-v2 (HF folder) both use
    BERT's uncased 30522-piece vocabulary: the GGUF WordPiece must tokenize as tokenizer.json."""
    from tokenmill.loader import pypi_models
    from tokenmill.tokenizer.tokenizer import Tokenizer

    try:  # the recipes come with the embeddings work (issue 19)
        gguf = pypi_models.fetch("nomic-embed-text-v1.5-f16")
        folder = pypi_models.fetch("all-minilm-l6-v2")
    except (KeyError, pypi_models.ModelFetchError) as exc:
        pytest.skip(f"models unavailable: {exc}")
    ours, reference = Tokenizer.from_pretrained(str(gguf)), Tokenizer.from_pretrained(str(folder))
    assert ours.backend.get_vocab() == reference.backend.get_vocab()
    for text in ["search_query: What is TSNE?", "Héllo, WORLD!! 日本語 naïve café",
                 "tab\tnew\nline  x", "don't stop-believing #1 3.14", "[CLS] hi [SEP]", ""]:
        assert ours.encode(text) == reference.encode(text), text


def _sentencepiece_reference(text: str, meta) -> list[int]:
    """SentencePiece BPE by its definition, slowly: cut out user-defined tokens, write spaces
    as "▁", then repeatedly merge the adjacent pair whose concatenation is the vocabulary
    piece with the highest score (leftmost on ties); unknown characters become byte tokens."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    user = sorted((t for t, k in zip(tokens, types, strict=True) if k == 4), key=len, reverse=True)
    prefix = "▁" if meta.get("tokenizer.ggml.add_space_prefix", True) else ""
    ids: list[int] = []
    first, rest = True, text
    while rest:
        cut = min((p for p in (rest.find(u) for u in user) if p >= 0), default=len(rest))
        if cut > 0:
            symbols = list((prefix if first else "") + rest[:cut].replace(" ", "▁"))
            while True:
                pairs = [(scores[vocab[a + b]], -i) for i, (a, b) in
                         enumerate(itertools.pairwise(symbols)) if a + b in vocab]
                if not pairs:
                    break
                i = -max(pairs)[1]
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            for s in symbols:
                ids += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
            first, rest = False, rest[cut:]
            continue
        match = next(u for u in user if rest.startswith(u))
        ids.append(vocab[match])
        rest = rest[len(match):]
    return ids


def test_sentencepiece_reference_agrees_with_llama_cpp(vocabs):
    """The slow reference used for Gemma 3 below reproduces llama.cpp's expected ids."""
    test = llama_cpp_vocabs.read_vocab_test(vocabs, "llama-spm")
    meta = read_gguf_metadata(str(test.gguf))
    for text, expected in test.cases:
        assert tuple(_sentencepiece_reference(text, meta)) == expected, text


@pytest.mark.slow
def test_gemma3_gguf_tokenizer_is_sentencepiece_bpe():
    """The real Gemma 3 270M GGUF (262,144 pieces, no merges stored: recovered from scores)
    against the algorithm's definition, plus its chat markup and round trips."""
    from tokenmill.loader import pypi_models

    try:
        path = pypi_models.fetch("gemma-3-270m-q4_k_m")
    except pypi_models.ModelFetchError as exc:
        pytest.skip(f"Gemma 3 GGUF unavailable: {exc}")
    meta = read_gguf_metadata(str(path))
    tok = tokenizer_from_gguf_metadata(meta)
    texts = ["Hello world, this is  a test.", " leading space", "12345 😀 ∮ 𝔘𝔫𝔦",
             "Ünïcödé façade — naïve 日本語のテキスト", "def f(x):\n    return x**2\n",
             "<b>bold</b> &amp;", "a  b   c    d\t\te"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _sentencepiece_reference(text, meta), text
        assert tok.decode(ids) == text
    turn = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n")
    assert turn[:2] == [tok.bos_token_id, tok.token_to_id("<start_of_turn>")]
    assert tok.token_to_id("<end_of_turn>") in turn
