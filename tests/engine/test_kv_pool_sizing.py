"""``--kv-cache-memory auto``: the pool's size from free memory (a pure function, tested
with made-up numbers), the weights mapped from a file taken off, and the start-up line."""

from __future__ import annotations

import mmap
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tokenmill import LLM
from tokenmill.engine import kv_pool_sizing
from tokenmill.engine.kv_pool_sizing import (
    AUTO_FRACTION,
    KVPoolSize,
    auto_kv_cache_bytes,
    mapped_weight_bytes,
)

GiB = 1024**3


def test_auto_size_is_a_share_of_available_memory_less_mapped_weights():
    assert AUTO_FRACTION == 0.5
    assert auto_kv_cache_bytes(16 * GiB, 0, cap=None) == 8 * GiB
    assert auto_kv_cache_bytes(16 * GiB, 2 * GiB, cap=None) == 7 * GiB
    assert auto_kv_cache_bytes(16 * GiB, 2 * GiB, cap=3 * GiB) == 3 * GiB  # capped
    assert auto_kv_cache_bytes(1 * GiB, 2 * GiB, cap=None) == 0  # nothing left
    assert auto_kv_cache_bytes(10 * GiB, 0, cap=None, fraction=0.8) == 8 * GiB
    with pytest.raises(ValueError):
        auto_kv_cache_bytes(GiB, 0, cap=None, fraction=0)


def test_start_up_line_says_size_fit_and_concurrency():
    pool = KVPoolSize(nbytes=3 * GiB, auto=True, available=8 * GiB,
                      mapped_weights=2 * GiB, fraction=0.5, cap=None)
    # 12 KiB per token (Qwen2.5-0.5B in float16): 3 GiB = 262144 tokens
    line = pool.describe(3 * GiB, 262144, torch.float16, max_model_len=32768,
                         model_context=32768, max_num_seqs=128)
    assert line.startswith("3.0 GiB float16 = 262,144 tokens")
    assert "auto: 50% of 8.0 GiB available less 2.0 GiB of mapped weights" in line
    assert "8 requests of max_model_len 32,768 tokens fit" in line
    assert "maximum concurrency for 32,768 tokens per request: 8.00x" in line
    fixed = KVPoolSize(nbytes=GiB, auto=False).describe(GiB, 1000, torch.float32, 300,
                                                        4096, 4)
    assert "set by --kv-cache-memory" in fixed and "3 requests of max_model_len 300" in fixed
    assert "per request: 0.24x" in fixed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mapped_weights_are_those_in_file_mappings(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0" * (1 << 20))
    with open(file, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    model = nn.Linear(64, 64)  # parameters in process memory: not counted
    assert mapped_weight_bytes(model) == 0
    model.packed = SimpleNamespace(data=torch.frombuffer(mapped, dtype=torch.uint8))
    assert mapped_weight_bytes(model) == 1 << 20
    model.packed = SimpleNamespace(parts=[SimpleNamespace(data=model.packed.data[4096:])])
    assert mapped_weight_bytes(model) == 1 << 20


def test_engine_sizes_the_pool_from_free_memory(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(kv_pool_sizing, "mem_available", lambda: 16 * 2**20)
    llm = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, max_num_seqs=64,
              show_progress=False)  # 512 B per token: the cap is 64 x 512 tokens, 16 MiB
    runner = llm.engine.runner
    assert runner.kv_pool.auto and not runner.kv_pool.capped
    assert runner.kv_cache_bytes == 8 * 2**20  # half of the 16 MiB "available"
    monkeypatch.setattr(kv_pool_sizing, "mem_available", lambda: 8 * GiB)
    capped = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, max_num_seqs=4,
                 show_progress=False).engine
    assert capped.runner.kv_pool.capped  # 4 requests of the model's 512 tokens at most
    assert capped.runner.num_blocks * 16 == 4 * 512
    assert "capped at what max_num_seqs requests" in capped.runner.kv_cache_line(512, 4)
    explicit = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True,
                   kv_cache_memory="2MiB", show_progress=False).engine.runner
    assert not explicit.kv_pool.auto and explicit.kv_cache_bytes == 2 * 2**20


def test_serve_banner_prints_the_pool_line(tiny_model_dir):
    from tokenmill.server.cli_serve import banner

    engine = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="1MiB",
                 max_num_seqs=8, show_progress=False).engine
    served = SimpleNamespace(engine=engine, engine_config=engine.config,
                             model_config=engine.model_config,
                             max_model_len=engine.max_model_len, kv_dtype=engine.kv_dtype,
                             kv_cache_shape=(engine.runner.num_blocks, 16))
    text = banner(served, ["tiny"], "http://127.0.0.1:8000", False)
    assert ("KV cache  1.0 MiB float32 = 2,048 tokens (set by --kv-cache-memory); 4 "
            "requests of max_model_len 512 tokens fit (max_num_seqs 8); maximum "
            "concurrency for 512 tokens per request: 4.00x") in text
