"""The radix prefix cache: tree invariants under random operations, and greedy outputs
identical with the cache on and off."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence

BS = 4


def test_match_insert_and_evict_subtree():
    kv = BlockManager(8, BS, enable_prefix_caching=True)
    tree = kv.prefix_cache
    tokens = list(range(12))
    tree.insert(tokens, [5, 6, 7])
    assert tree.match(tokens) == [5, 6, 7]
    assert tree.match(tokens[:11]) == [5, 6]      # only full blocks
    assert tree.match([0, 1, 2, 9] + tokens[4:]) == []
    tree.insert(tokens[:4] + [9, 9, 9, 9], [5, 1])  # a sibling branch under block 5
    assert tree.depth(1) == 1 and tree.depth(7) == 2
    tree.evict(6)                                  # drops 6 and 7, keeps 5 and 1
    assert tree.match(tokens) == [5] and tree.match(tokens[:4] + [9] * 4) == [5, 1]
    tree.evict(5)
    assert len(tree) == 0
    tree.check_integrity()


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "finish"]),
                              st.integers(0, 5), st.integers(1, 30)),
                    min_size=1, max_size=60))
def test_random_requests_keep_every_invariant(ops):
    """Requests drawn from a few shared prefixes arrive, compute, publish and finish in a
    random order over a small pool; tree, ref counts and free list stay consistent and a
    block is never both free and referenced."""
    kv = BlockManager(12, BS, enable_prefix_caching=True)
    prefixes = [[p] * 9 + list(range(p, p + 7)) for p in range(6)]
    live: list[Sequence] = []
    for n, (op, which, length) in enumerate(ops):
        if op == "add":
            tokens = (prefixes[which] + list(range(100, 100 + length)))[: 8 + length]
            req = Sequence(str(n), tokens, SamplingParams())
            hit = kv.match_prefix(req)
            assert len(hit) * BS < req.num_tokens  # never the last token
            if kv.allocate_slots(req, req.num_tokens - len(hit) * BS, hit):
                live.append(req)
        elif op == "step" and live:
            req = live[which % len(live)]
            req.num_computed_tokens = req.num_tokens  # its K/V is now written
            kv.cache_full_blocks(req)
        elif op == "finish" and live:
            kv.free(live.pop(which % len(live)))
        kv.check_integrity(live)
        referenced = {b for r in live for b in r.block_ids}
        assert not referenced & set(kv.pool._free)
    for r in live:
        kv.free(r)
    kv.check_integrity([])
    assert kv.num_free_blocks == 12


SHARED = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def run(llm: LLM, prompts):
    engine = llm.engine
    ids = [engine.add_request(p, SHARED) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.scheduler.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.pool.num_blocks
    return [done[i] for i in ids]


@pytest.mark.parametrize("pool_blocks", [400, 24])
def test_outputs_identical_with_cache_on_and_off(tiny_model_dir, pool_blocks):
    """Shared system prefixes of 40 tokens (ending inside a block), repeated prompts and
    prompts extending earlier outputs. With 24 blocks the cache evicts mid-run."""
    path = tiny_model_dir("llama")
    system = random_prompts(2, 512, seed=21, min_len=40, max_len=40)
    questions = random_prompts(10, 512, seed=22, min_len=3, max_len=30)
    prompts = [system[i % 2] + q for i, q in enumerate(questions)] + [system[0] + questions[0]]
    kw = dict(skip_tokenizer_init=True, kv_cache_memory=pool_blocks * 16 * 512,
              max_model_len=128, max_num_batched_tokens=48, show_progress=False)
    on, off = LLM(path, **kw), LLM(path, enable_prefix_caching=False, **kw)
    first_on, first_off = run(on, prompts), run(off, prompts)
    assert [o.outputs[0].token_ids for o in first_on] == \
        [o.outputs[0].token_ids for o in first_off]
    # second wave: the same prompts again plus prompts that continue the first outputs
    follow = prompts + [p + o.outputs[0].token_ids for p, o in zip(prompts, first_off,
                                                                    strict=True)]
    second_on, second_off = run(on, follow), run(off, follow)
    assert [o.outputs[0].token_ids for o in second_on] == \
        [o.outputs[0].token_ids for o in second_off]
    hits = sum(o.num_cached_tokens for o in second_on)
    assert hits > 0 and all(o.num_cached_tokens == 0 for o in second_off)
    evicted = on.engine.block_manager.prefix_cache.num_evicted
    assert evicted > 0 if pool_blocks == 24 else evicted == 0


def test_n_siblings_share_the_prompt_blocks(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="4MiB",
              show_progress=False)
    prompt = random_prompts(1, 512, seed=30, min_len=50, max_len=50)[0]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    kv = llm.engine.block_manager
    # siblings 1 and 2 found sequence 0's three full prompt blocks in the cache
    assert kv.num_hit_tokens == 2 * 48
    alone = LLM(tiny_model_dir("llama"), skip_tokenizer_init=True, kv_cache_memory="4MiB",
                show_progress=False, enable_prefix_caching=False)
    again = alone.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_lpm_serves_cached_prefixes_first_without_starving(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="4MiB", show_progress=False,
              scheduling_policy="lpm", max_num_seqs=1)
    shared = random_prompts(1, 512, seed=31, min_len=48, max_len=48)[0]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([shared + [7]], params, use_tqdm=False)     # warm the cache
    engine = llm.engine
    cold = engine.add_request(random_prompts(1, 512, seed=32, min_len=40, max_len=40)[0],
                              params)
    warm = engine.add_request(shared + [9, 9], params)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [warm, cold]  # the later, cached one went first
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(path, skip_tokenizer_init=True, scheduling_policy="sjf", show_progress=False)
