"""The routing core on fake workloads: prefix tree bookkeeping, hit rates and balance."""

from __future__ import annotations

import random

import pytest

from tokenmill.distributed.routing import PrefixTree, Router, RouterConfig


def test_tree_match_is_per_tenant_and_in_whole_chunks():
    t = PrefixTree(chunk=4)
    t.insert(list(range(10)), "a")          # chunks 0-3, 4-7 (8, 9 are not a whole chunk)
    t.insert(list(range(6)) + [99] * 6, "b")
    assert t.match(list(range(12))) == {"a": 8, "b": 4}
    assert t.match([7, 7, 7, 7]) == {}
    assert t.match("abcdefgh") == {}
    t.insert("abcdefgh", "a")
    assert t.match("abcdefgz") == {"a": 4}


def test_tree_eviction_drops_deepest_first_and_unlinks_nodes():
    t = PrefixTree(chunk=2, max_chunks_per_tenant=3)
    t.insert([1, 1, 2, 2, 3, 3], "a")   # 3 chunks: at the bound
    t.insert([1, 1, 5, 5], "a")         # +1 chunk: the oldest ([3,3], deepest) goes
    assert t.size("a") == 3
    assert t.match([1, 1, 2, 2, 3, 3]) == {"a": 4}
    assert t.match([1, 1, 5, 5]) == {"a": 4}
    t.insert([9, 9], "b")
    t.remove_tenant("a")
    assert t.match([1, 1, 2, 2]) == {}
    assert t.num_nodes() == 1  # only b's chunk is left


def test_tree_stays_bounded_under_a_long_random_workload():
    rng = random.Random(0)
    t = PrefixTree(chunk=4, max_chunks_per_tenant=50)
    for _ in range(500):
        t.insert([rng.randrange(100) for _ in range(40)], rng.choice("ab"))
    assert t.size("a") <= 50 and t.size("b") <= 50
    assert t.num_nodes() <= 100


def _shared_prefix_workload(groups=16, per_group=8, prefix=64, seed=0):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(prefix)] for _ in range(groups)]
    reqs = [(g, prefixes[g] + [rng.randrange(1000) for _ in range(8)])
            for g in range(groups) for _ in range(per_group)]
    rng.shuffle(reqs)
    return reqs


def _run(policy: str, reqs, tenants=2, concurrency=4, capacity=36):
    """Routes the workload with ``concurrency`` requests in flight (FIFO completion), each
    tenant remembering ``capacity`` chunks (36: about half of 16 groups x 4 chunks, like
    a replica whose cache holds half the groups); returns (share of prompt tokens hit,
    requests per tenant, groups per tenant)."""
    r = Router(RouterConfig(policy=policy, chunk=16, max_chunks_per_tenant=capacity))
    for i in range(tenants):
        r.add_tenant(i)
    in_flight, per_tenant, groups = [], [0] * tenants, [set() for _ in range(tenants)]
    for g, prompt in reqs:
        if len(in_flight) == concurrency:
            r.finished(in_flight.pop(0))
        t = r.route(prompt)
        r.started(t)
        in_flight.append(t)
        per_tenant[t] += 1
        groups[t].add(g)
    return r.matched_items / sum(len(p) for _, p in reqs), per_tenant, groups


def test_cache_aware_keeps_each_group_on_one_replica_and_beats_round_robin():
    reqs = _shared_prefix_workload()
    hit_ca, per_ca, groups_ca = _run("cache_aware", reqs)
    hit_rr, per_rr, groups_rr = _run("round_robin", reqs)
    # each group's prefix lands on one replica: 7 of 8 requests per group match 64 of 72
    assert hit_ca == pytest.approx(7 / 8 * 64 / 72, abs=0.02)
    assert len(groups_ca[0] & groups_ca[1]) == 0
    assert hit_ca >= 1.5 * hit_rr
    # with room for everything, round robin hits too (each replica sees every group)
    hit_rr_big, _, _ = _run("round_robin", reqs, capacity=1000)
    assert hit_rr_big > 1.2 * hit_rr
    # the groups are spread, not all on one replica
    assert min(per_ca) >= 0.3 * sum(per_ca)
    assert per_rr == [64, 64]


def test_least_load_and_round_robin_balance():
    reqs = _shared_prefix_workload(seed=1)
    _, per_ll, _ = _run("least_load", reqs, tenants=3, concurrency=6)
    assert max(per_ll) - min(per_ll) <= 2
    _, per_rr, _ = _run("round_robin", reqs, tenants=3)
    assert max(per_rr) - min(per_rr) <= 1


def test_cache_aware_falls_back_to_least_loaded_when_imbalanced():
    r = Router(RouterConfig(balance_abs_threshold=4, balance_rel_threshold=1.5, chunk=4))
    r.add_tenant("a"), r.add_tenant("b")
    prompt = list(range(32))
    assert r.route(prompt) == "a"  # new: least loaded (tie: first)
    for _ in range(4):  # a is busy, but within the thresholds: the cache wins
        r.started("a")
        assert r.route(prompt) == "a"
    r.started("a")     # 5 vs 0: over both thresholds -> least loaded
    assert r.route(prompt) == "b"


def test_removed_tenant_gets_nothing_and_unknown_policy_is_refused():
    r = Router(RouterConfig(policy="cache_aware", chunk=4))
    r.add_tenant(0), r.add_tenant(1)
    p = list(range(16))
    first = r.route(p)
    r.remove_tenant(first)
    assert all(r.route(p) != first for _ in range(4))
    assert r.route(p, exclude=frozenset()) in r.tenants
    with pytest.raises(LookupError):
        r.route(p, exclude=frozenset(r.tenants))
    with pytest.raises(ValueError, match="routing policy"):
        RouterConfig(policy="random")
