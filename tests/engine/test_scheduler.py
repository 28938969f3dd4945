"""Block pool and scheduler, without a model: fake tokens, real bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager, BlockPool
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.sampling_params import SamplingParams


def make_request(i: int, prompt_len: int, max_tokens: int, priority: int = 0) -> Sequence:
    return Sequence(str(i), list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                   priority=priority, arrival_time=float(i))


def drive(sched: Scheduler, requests: list[Sequence], abort_at: dict[int, int] | None = None,
          arrive_at: list[int] | None = None, max_steps: int = 10_000) -> int:
    """Runs fake steps until every request is done; returns the number of steps.
    Sequence i joins at step ``arrive_at[i]`` (all at step 0 by default)."""
    abort_at = abort_at or {}
    arrive_at = arrive_at or [0] * len(requests)
    for step in range(max_steps):
        for r, when in zip(requests, arrive_at, strict=True):
            if when == step:
                sched.add_request(r)
        if not sched.num_unfinished:
            if step > max(arrive_at):
                return step
            continue
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert not out.is_empty()
        samplers = [s.request for s in out.scheduled if s.samples]
        sched.update_after_step(out)
        for r in samplers:
            r.output_token_ids.append(7)
            if r.num_output_tokens >= r.sampling_params.max_tokens:
                sched.finish_request(r, SequenceStatus.FINISHED_LENGTH)
        for idx, when in abort_at.items():
            if when == step:
                sched.finish_request(requests[idx], SequenceStatus.FINISHED_ABORTED)
        sched.check_integrity()
    raise AssertionError("requests did not finish")


def test_block_pool_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free_blocks == 1
    pool.free(a[:1])
    pool.check_integrity()
    with pytest.raises(RuntimeError):
        pool.free(a[:1])  # double free is caught
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    pool.free(a[1:])
    assert pool.num_free_blocks == 4


def test_block_pool_counts_blocks_ever_used():
    """The resident share of a lazily mapped pool: blocks handed out at least once."""
    cached = {1}
    pool = BlockPool(6, is_cached=cached.__contains__)
    assert pool.num_touched_blocks == 0
    a = pool.allocate(2)
    assert a == [0, 1]
    pool.free(a)
    assert pool.num_touched_blocks == 2
    # the used block holding nothing cached first, then never-used ones, the cached last
    b = pool.allocate(5)
    assert b == [0, 2, 3, 4, 5] and pool.num_touched_blocks == 6
    pool.check_integrity()
    pool.free(b)
    assert pool.allocate(6) == [5, 4, 3, 2, 0, 1]  # spare ones most recent first
    assert pool.num_touched_blocks == 6


def test_block_pool_without_a_cache_reuses_before_touching_new_blocks():
    pool = BlockPool(8)
    for _ in range(5):
        pool.free(pool.allocate(3))
    assert pool.num_touched_blocks == 3  # RSS stays at what was in use at once
    pool.check_integrity()


def test_chunked_prefill_mixes_with_decodes():
    kv = BlockManager(64, 16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10), kv, 512)
    short, long_ = make_request(0, 3, 5), make_request(1, 40, 5)
    sched.add_request(short)
    sched.add_request(long_)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("0", 3), ("1", 7)]
    sched.update_after_step(out)
    short.output_token_ids.append(1)
    out = sched.schedule()  # the decode of 0 and the next chunk of 1 share a step
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("0", 1), ("1", 9)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples


def test_preemption_picks_lowest_priority_then_latest():
    kv = BlockManager(6, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), kv, 24)
    reqs = [make_request(0, 8, 20, priority=0), make_request(1, 8, 20, priority=1),
            make_request(2, 8, 20, priority=0)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert len(out.scheduled) == 3 and kv.num_free_blocks == 0
    sched.update_after_step(out)
    for r in reqs:
        r.output_token_ids.append(1)
    out = sched.schedule()  # everyone needs a 3rd block: request 1 (priority 1) goes first
    assert out.preempted[0] is reqs[1]
    assert reqs[1].status == SequenceStatus.PREEMPTED and reqs[1].block_ids == []
    assert reqs[1] in sched.waiting
    sched.check_integrity()


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 30), st.integers(0, 2),
                            st.integers(0, 40)),
                  min_size=1, max_size=24),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(1, 128),
    max_seqs=st.integers(1, 16),
    aborts=st.dictionaries(st.integers(0, 23), st.integers(0, 50), max_size=4),
)
def test_random_workloads_finish_and_free_every_block(lens, num_blocks, block_size, budget,
                                                      max_seqs, aborts):
    max_model_len = num_blocks * block_size
    kv = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
                      kv, max_model_len)
    reqs = []
    for i, (p, m, prio, _) in enumerate(lens):
        p = min(p, max_model_len - 1)
        m = min(m, max_model_len - p)
        reqs.append(make_request(i, p, m, prio))
    drive(sched, reqs, {k: v for k, v in aborts.items() if k < len(reqs)},
          arrive_at=[a for *_, a in lens])
    assert kv.num_free_blocks == num_blocks
    for r in reqs:
        assert r.is_finished and r.block_ids == []
        if r.status == SequenceStatus.FINISHED_LENGTH:
            assert r.num_output_tokens == r.sampling_params.max_tokens
