"""The asyncio front: concurrent streams, early exits, queue limits, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.async_engine import AsyncEngine, QueueFullError

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def make(tiny_model_dir, **kw) -> AsyncEngine:
    return AsyncEngine.from_flags(model=tiny_model_dir("llama"), skip_tokenizer_init=True,
                                  kv_cache_memory="2MiB", max_model_len=256,
                                  show_progress=False, **kw)


async def collect(engine: AsyncEngine, prompt, rid: str, params=GREEDY):
    outs = [out async for out in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_the_offline_engine(tiny_model_dir):
    prompts = random_prompts(8, 512, seed=4, min_len=3, max_len=50)
    expected = [o.outputs[0].token_ids for o in LLM(
        tiny_model_dir("llama"), skip_tokenizer_init=True, show_progress=False,
        kv_cache_memory="2MiB").generate(prompts, GREEDY, use_tqdm=False)]

    async def main():
        engine = make(tiny_model_dir)
        engine.start()
        results = await asyncio.gather(*(collect(engine, p, f"r{i}")
                                         for i, p in enumerate(prompts)))
        await engine.shutdown()
        return results, engine

    results, engine = asyncio.run(main())
    assert engine.integrity_failures == 0
    for outs, tokens in zip(results, expected, strict=True):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == tokens
        # cumulative outputs only grow
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens)
    assert engine.engine.block_manager.usage == 0.0


def test_leaving_early_aborts_and_frees_blocks(tiny_model_dir):
    async def main():
        engine = make(tiny_model_dir)
        engine.start()
        long_params = SamplingParams(max_tokens=200, ignore_eos=True)
        agen = engine.generate([5] * 40, long_params, "leaver")
        async for _ in agen:
            break
        await agen.aclose()
        # a cancelled task aborts too
        task = asyncio.create_task(collect(engine, [6] * 40, "cancelled", long_params))
        await asyncio.sleep(0.3)
        task.cancel()
        deadline = time.monotonic() + 10
        while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_bad_requests_fail_before_queueing_and_the_queue_has_a_limit(tiny_model_dir):
    async def main():
        engine = make(tiny_model_dir, max_queued_requests=1, max_num_seqs=1)
        engine.start()
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, [1] * 300, "too-long")
        slow = SamplingParams(max_tokens=100, ignore_eos=True)
        tasks = [asyncio.create_task(collect(engine, [7] * 10, f"q{i}", slow))
                 for i in range(4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        refused = [r for r in results if isinstance(r, QueueFullError)]
        served = [r for r in results if isinstance(r, list)]
        ok = await collect(engine, [3, 4, 5], "after")
        await engine.shutdown()
        return refused, served, ok

    refused, served, ok = asyncio.run(main())
    assert refused and served
    assert all(r[-1].outputs[0].finish_reason == "length" for r in served)
    assert ok[-1].finished


def test_from_flags_builds_the_engine_in_its_thread(tiny_model_dir):
    """The engine thread builds the engine (so it is the only thread doing parallel work);
    a failure to build is raised to the caller, and no thread is left behind."""
    import threading

    built_in = []
    from tokenmill.engine import engine as engine_module
    original = engine_module.Engine.__init__

    def spy(self, *args, **kwargs):
        built_in.append(threading.current_thread().name)
        original(self, *args, **kwargs)

    engine_module.Engine.__init__ = spy
    try:
        engine = make(tiny_model_dir)
    finally:
        engine_module.Engine.__init__ = original
    assert built_in == ["tokenmill-engine"] and engine.is_running
    asyncio.run(engine.shutdown())
    with pytest.raises((ValueError, OSError)):
        AsyncEngine.from_flags(model=str(tiny_model_dir("llama")) + "-missing",
                               skip_tokenizer_init=True, show_progress=False)
    assert not any(t.name == "tokenmill-engine" and t.is_alive()
                   for t in threading.enumerate())
