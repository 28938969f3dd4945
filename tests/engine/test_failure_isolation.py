"""One request's failure ends that request only: the engine finds it by retrying the
failed step's sequences alone, ends it with finish_reason "error", frees its blocks and
keeps serving the others, whose tokens do not change."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    Mailbox,
    RequestFailedError,
)
from tokenmill.engine.engine import Engine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# the marker: the sampler "breaks" on a row with this max_tokens once it has 3 tokens
BAD = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)


def make_llm(tiny_model_dir, **kw) -> LLM:
    return LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="2MiB",
               max_model_len=256, show_progress=False, **kw)


def break_sampler_on_marker(engine: Engine, calls: list[int]) -> None:
    """The sampler raises for any batch holding a marked row that has 3 output tokens
    (the failure depends on one request's data, as a real bug would)."""
    sampler = engine.runner.sampler
    original = sampler.__call__

    def broken(logits, meta):
        calls.append(len(meta.rows))
        if any(r.params.max_tokens == 13 and len(r.output_token_ids) >= 3
               for r in meta.rows):
            raise RuntimeError("injected sampler failure")
        return original(logits, meta)

    engine.runner.sampler = broken


def assert_all_free(engine: Engine) -> None:
    engine.scheduler.check_integrity()
    pool = engine.block_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not engine.scheduler.suspects and not engine.has_unfinished_requests()


@pytest.mark.parametrize("seeded", [False, True])
def test_a_failing_request_ends_alone_and_the_others_are_unchanged(tiny_model_dir, seeded):
    prompts = random_prompts(6, 512, seed=3, min_len=3, max_len=40)
    if seeded:  # seeded random sampling: a retried step draws the same tokens again
        params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12,
                                 ignore_eos=True) for i in range(len(prompts))]
    else:
        params = [GREEDY] * len(prompts)
    expected = [o.outputs[0].token_ids
                for o in make_llm(tiny_model_dir).generate(prompts, params, use_tqdm=False)]

    llm = make_llm(tiny_model_dir)
    calls: list[int] = []
    break_sampler_on_marker(llm.engine, calls)
    outs = llm.generate(prompts[:3] + [[9, 8, 7, 6]] + prompts[3:],
                        params[:3] + [BAD] + params[3:], use_tqdm=False)
    bad = outs.pop(3).outputs[0]
    assert bad.finish_reason == "error"
    assert "injected sampler failure" in bad.stop_reason
    assert len(bad.token_ids) == 3  # what it had before the failing step
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert 1 in calls and max(calls) > 1  # retried alone, then batched again
    assert_all_free(llm.engine)
    # the engine keeps serving
    again = llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected[:2]
    assert_all_free(llm.engine)


def test_a_failing_request_with_n_ends_with_its_siblings(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    break_sampler_on_marker(llm.engine, [])
    bad_n = SamplingParams(n=3, temperature=0, max_tokens=13, ignore_eos=True)
    outs = llm.generate([[5, 6, 7, 8, 9], [3, 4, 5]], [bad_n, GREEDY], use_tqdm=False)
    assert [o.finish_reason for o in outs[0].outputs] == ["error"] * 3
    assert outs[1].outputs[0].finish_reason == "length"
    assert_all_free(llm.engine)


def make_async(tiny_model_dir) -> AsyncEngine:
    engine = AsyncEngine.from_flags(model=tiny_model_dir("llama"), skip_tokenizer_init=True,
                                    kv_cache_memory="2MiB", max_model_len=256,
                                    show_progress=False)
    return engine


async def collect(engine: AsyncEngine, prompt, rid: str, params):
    return [out async for out in engine.generate(prompt, params, rid)]


def test_the_async_engine_fails_one_stream_and_keeps_serving(tiny_model_dir):
    prompts = random_prompts(4, 512, seed=5, min_len=3, max_len=30)
    expected = [o.outputs[0].token_ids
                for o in make_llm(tiny_model_dir).generate(prompts, GREEDY, use_tqdm=False)]

    async def main():
        engine = make_async(tiny_model_dir)
        break_sampler_on_marker(engine.engine, [])
        results = await asyncio.gather(
            *(collect(engine, p, f"r{i}", GREEDY) for i, p in enumerate(prompts)),
            collect(engine, [9, 8, 7], "bad", BAD), return_exceptions=True)
        after = await collect(engine, prompts[0], "after", GREEDY)
        alive = engine.is_running
        await engine.shutdown()
        return engine, results, after, alive

    engine, results, after, alive = asyncio.run(main())
    *good, bad = results
    assert isinstance(bad, RequestFailedError), bad
    assert "injected sampler failure" in str(bad)
    assert bad.output.outputs[0].finish_reason == "error"
    assert [r[-1].outputs[0].token_ids for r in good] == expected
    assert after[-1].outputs[0].token_ids == expected[0]
    assert alive and engine.integrity_failures == 0
    assert_all_free(engine.engine)


def test_an_engine_that_cannot_step_at_all_is_dead(tiny_model_dir):
    """A failure no request can be blamed for (here the scheduler's own) still ends the
    engine, after a few tries: every stream, then every new request, gets
    EngineDeadError."""
    async def main():
        engine = make_async(tiny_model_dir)

        def broken():
            raise RuntimeError("scheduler state is corrupt")

        engine.engine.scheduler.schedule = broken
        with pytest.raises(EngineDeadError):
            await collect(engine, [1, 2, 3], "a", GREEDY)
        with pytest.raises(EngineDeadError):
            await collect(engine, [1, 2, 3], "b", GREEDY)
        alive = engine.is_running
        await engine.shutdown()
        return alive

    assert asyncio.run(main()) is False


# ---- per-stream buffers hold one output ---------------------------------------------


def test_the_mailbox_keeps_the_latest_and_never_replaces_a_final_item():
    class Out:
        def __init__(self, n, finished=False):
            self.n, self.finished = n, finished

    async def main():
        box = Mailbox()
        box.put_nowait(Out(1))
        assert (await box.get()).n == 1
        for n in range(2, 50):
            box.put_nowait(Out(n))
        assert box.qsize() == 1 and (await box.get()).n == 49
        box.put_nowait(Out(50, finished=True))
        box.put_nowait(Out(51))
        box.put_nowait(EngineDeadError("late"))
        assert (await box.get()).n == 50
        box.put_nowait(Out(60))
        box.put_nowait(EngineDeadError("dead"))
        box.put_nowait(Out(61))
        assert isinstance(await box.get(), EngineDeadError)
        # a reader waiting gets the next put at once
        waiter = asyncio.create_task(box.get())
        await asyncio.sleep(0)
        box.put_nowait(Out(70))
        assert (await waiter).n == 70

    asyncio.run(main())


def test_a_stream_nobody_reads_buffers_one_output(tiny_model_dir):
    async def main():
        engine = make_async(tiny_model_dir)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        agen = engine.generate([5, 6, 7], params, "idle-reader")
        first = await agen.__anext__()
        box = engine._streams["idle-reader"][1]
        for _ in range(3000):  # 39 more steps, none read, until the last one is in
            if not engine.engine.has_unfinished_requests() and getattr(
                    getattr(box, "_item", None), "finished", False):
                break
            await asyncio.sleep(0.01)
        buffered = box.qsize()
        rest = [out async for out in agen]
        await engine.shutdown()
        return first, buffered, rest

    first, buffered, rest = asyncio.run(main())
    assert len(first.outputs[0].token_ids) == 1
    assert buffered == 1
    assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 40
