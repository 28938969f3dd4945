"""``--tensor-parallel-size 2``: a tiny Llama sharded over two gloo ranks gives TP=1's
greedy tokens and logprobs (through the serving path: rank 0's engine loop broadcasts its
commands, rank 1 follows in lockstep), and a rank killed with SIGKILL fails the request in
flight without a hang, after which the group is restarted."""

from __future__ import annotations

import pytest

from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 250], [300, 2, 11], list(range(40, 70))]
PARAMS = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


def _generate(model_dir: str):
    from tokenmill.entrypoints.llm import LLM

    llm = LLM(model_dir, skip_tokenizer_init=True, kv_cache_memory="4MiB",
              show_progress=False)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    # this rank's share: the KV cache holds as many heads as the layer
    assert llm.engine.model_config.num_kv_heads == attn.num_kv_heads
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return attn.num_heads, [(o.outputs[0].token_ids,
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                             strict=True)]) for o in outs]


def test_tensor_parallel_replica_serves_in_lockstep_and_survives_a_dead_rank(tiny_model_dir):
    """``--tensor-parallel-size 2`` through the serving path (one replica: rank 0 runs the
    scheduler and broadcasts its commands to rank 1): TP=1's greedy tokens; a follower
    killed with SIGKILL fails the request in flight (no hang), and the group restarts."""
    import asyncio
    import os
    import signal
    import time

    from tokenmill.engine.async_engine import EngineDeadError, RequestFailedError
    from tokenmill.replicas.dp_engine import DataParallelEngine

    model_dir = tiny_model_dir("llama")
    heads, reference = _generate(model_dir)
    assert heads == 4
    engine = DataParallelEngine.from_flags(
        data_parallel_size=1, tensor_parallel_size=2, model=model_dir,
        skip_tokenizer_init=True, kv_cache_memory="4MiB")
    assert engine.model_config.num_heads == 2  # rank 0's share of the 4 query heads

    async def run(prompt, rid, max_tokens=PARAMS["max_tokens"]):
        last = None
        params = SamplingParams(**{**PARAMS, "max_tokens": max_tokens})
        async for out in engine.generate(prompt, params, rid):
            last = out
        o = last.outputs[0]
        return o.token_ids, [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids,
                                                             strict=True)]

    async def go():
        engine.start()
        outs = await asyncio.gather(*(run(p, f"r{i}") for i, p in enumerate(PROMPTS)))
        for (ids, lp), (ref_ids, ref_lp) in zip(outs, reference, strict=True):
            assert ids == ref_ids
            assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < 1e-4
        constrained = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(
            regex="a+"))
        with pytest.raises(ValueError, match="structured outputs"):
            async for _ in engine.generate(PROMPTS[0], constrained, "constrained"):
                pass
        follower = engine.replicas[0].info.follower_pids[0]
        long = asyncio.ensure_future(run(PROMPTS[0], "long", max_tokens=400))
        await asyncio.sleep(0.3)
        os.kill(follower, signal.SIGKILL)
        with pytest.raises((RequestFailedError, EngineDeadError)):
            await asyncio.wait_for(long, 90)
        deadline = time.monotonic() + 90
        while engine.counters.restarts < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert engine.counters.restarts == 1
        assert (await run(PROMPTS[1], "after"))[0] == reference[1][0]
        await engine.shutdown(timeout=5)

    asyncio.run(go())
