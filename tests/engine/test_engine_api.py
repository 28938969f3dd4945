"""The offline API's contract: inputs, errors, aborts and block accounting."""

from __future__ import annotations

import pytest

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="2MiB",
               max_model_len=256, show_progress=False)


def all_free(llm: LLM) -> bool:
    pool = llm.engine.block_manager.pool
    return pool.num_free_blocks == pool.num_blocks


def test_bad_prompts_are_refused_and_take_no_blocks(llm):
    for bad in ([], [1, 2, 100_000], [-1], [5] * 300):
        with pytest.raises(ValueError):
            llm.generate([bad], SamplingParams(max_tokens=2), use_tqdm=False)
        assert all_free(llm) and not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={10_000: 1.0}), use_tqdm=False)
    # a bad prompt in a list does not leave its good neighbours queued
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], []], use_tqdm=False)
    assert all_free(llm) and not llm.engine.has_unfinished_requests()


def test_generate_accepts_one_or_many_token_prompts(llm):
    p = random_prompts(2, 512, seed=1, min_len=4, max_len=9)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    one = llm.generate(p[0], params, use_tqdm=False)
    many = llm.generate(p, params, use_tqdm=False)
    assert len(one) == 1 and len(many) == 2
    assert one[0].outputs[0].token_ids == many[0].outputs[0].token_ids
    assert many[1].prompt_token_ids == p[1]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(p, [params], use_tqdm=False)


def test_abort_frees_blocks_mid_generation(llm):
    engine = llm.engine
    prompts = random_prompts(4, 512, seed=2, min_len=20, max_len=50)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True))
           for p in prompts]
    for _ in range(3):
        engine.step()
    assert not all_free(llm)
    engine.abort_request(ids[1])
    engine.scheduler.check_integrity()
    for rid in ids:
        engine.abort_request(rid)
    assert all_free(llm) and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], request_id="x")
        engine.add_request([1, 2], request_id="x")
    engine.abort_request("x")
    assert all_free(llm)


def test_kv_cache_dtype(tiny_model_dir):
    """auto: float16 for a GGUF whose weights stay packed on the CPU, else the model's
    dtype; an explicit float16 cache holds twice the tokens in the same memory and still
    serves; bad values are refused."""
    import torch

    from tokenmill.config import EngineConfig
    from tokenmill.kernels.cpu import kernels

    gguf = EngineConfig.create(model="/m/model.gguf")
    assert gguf.cache.dtype == (torch.float16 if kernels() else torch.float32)
    for flags in ({"quantization": "none"}, {"dtype": "bfloat16"},
                  {"kv_cache_dtype": "float32"}):
        assert EngineConfig.create(model="/m/model.gguf", **flags).cache.dtype in (
            torch.float32, torch.bfloat16)
    assert EngineConfig.create(model="/m/hf-folder").cache.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.create(model="/m/hf-folder", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="for the CPU"):
        EngineConfig.create(model="/m/hf-folder", device="cuda", kv_cache_dtype="float16")
    sizes = {}
    for name in ("float32", "float16"):
        llm = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="2MiB",
                  kv_cache_dtype=name, show_progress=False)
        assert llm.engine.runner.kv_cache.layers[0][0].dtype == getattr(torch, name)
        sizes[name] = llm.engine.block_manager.pool.num_blocks
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=8,
                                                         ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8 and all_free(llm)
    assert sizes["float16"] == 2 * sizes["float32"]
