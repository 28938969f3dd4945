"""Our GGUF tokenizers against llama.cpp's vocabulary tests (test-tokenizer-0).

The files come from the llama-cpp-python sdist on PyPI, fetched once into the models cache by
``tokenmill.loader.llama_cpp_vocabs`` (see there). Each ``ggml-vocab-NAME.gguf`` is a real
model's tokenizer; its ``.inp``/``.out`` files pair texts with the ids the model's original
tokenizer gives them, encoded as llama.cpp's test does: no BOS/EOS, special-token text read as
plain text. Every vocabulary there is either supported (every line must match) or refused at
load with an error naming its tokenizer model and pre-tokenizer.
"""

from __future__ import annotations

import pytest

from tokenmill.gguf.reader import read_gguf_metadata
from tokenmill.loader import llama_cpp_vocabs
from tokenmill.tokenizer.gguf_tokenizer import (
    UnsupportedTokenizerError,
    tokenizer_from_gguf_metadata,
)

SUPPORTED = (
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
    "llama-spm", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
)
# (tokenizer.ggml.model, tokenizer.ggml.pre) the error must name
UNSUPPORTED = {"gemma-4": ("gemma4", None), "mpt": ("gpt2", "mpt")}
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
    text_encoder = tok._text_encoder()  # special-token text read as text, as llama.cpp's test
    wrong = []
    for text, expected in test.cases:
        got = tuple(text_encoder.encode(text, add_special_tokens=False).ids)
        if got != expected:
            wrong.append((text, expected, got))
        elif name not in NO_ROUND_TRIP:
            assert tok.decode(list(expected), skip_special_tokens=False) == text
    assert not wrong, f"{len(wrong)} of {len(test.cases)} lines differ, first: {wrong[0]}"


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
