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
    pool = llm.engine.kv_manager.pool
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
