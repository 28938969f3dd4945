"""SpecDecoder's policy: who proposes, how many tokens, and when proposals stop."""

from __future__ import annotations

import argparse

from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.spec_decode import SpecDecoder
from tokenmill.engine.spec_decode.suffix import SuffixProposer
from tokenmill.engine_args import EngineArgs
from tokenmill.sampling_params import SamplingParams

CFG = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1,
                        prompt_lookup_max=3, max_batch_rows=20, min_acceptance=0.3,
                        probe_interval=4)


def seq(tokens: list[int], **params) -> Sequence:
    return Sequence("s", tokens, SamplingParams(temperature=0, **params))


def test_ngram_proposes_what_followed_the_latest_match():
    s = seq([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3])
    assert SpecDecoder(CFG, 1000).propose(s, 10) == [7, 8, 2, 3]  # after the latest "2 3"
    s.output_token_ids.append(7)  # "2 3 7" now matches at its longest
    assert SpecDecoder(CFG, 1000).propose(s, 2) == [8, 2]


def test_limits_and_ineligible_requests():
    dec = SpecDecoder(CFG, 16)
    tokens = [1, 2, 3] * 3 + [1, 2]
    assert len(dec.propose(seq(tokens), 10)) == 4
    assert len(dec.propose(seq(tokens), 2)) == 2                    # the step's budget
    assert len(dec.propose(seq(tokens, max_tokens=3), 10)) == 2      # max_tokens - 1
    assert len(dec.propose(seq(tokens + [3, 1, 2]), 10)) == 2        # max_model_len 16
    assert dec.propose(seq(tokens, repetition_penalty=1.2), 10) == []
    assert dec.propose(seq(tokens, frequency_penalty=0.5), 10) == []
    assert dec.step_allows(4) and not dec.step_allows(5)             # 5 x (4 + 1) > 20


def test_low_acceptance_pauses_then_reprobes():
    dec = SpecDecoder(CFG, 1000)
    s = seq([5, 6, 7] * 3 + [5, 6])
    proposals = []
    for _ in range(12):
        drafts = dec.propose(s, 10)
        proposals.append(len(drafts))
        if drafts:
            dec.accept(s, drafts, [0] * (len(drafts) + 1))  # every proposal rejected
    # proposing until the estimate drops below 0.3 (1 -> 0.7 -> 0.49 -> 0.34 -> 0.24),
    # then one probe every 4 steps; the accepted length (4 -> 2.8 -> 1.96 -> 1.37 ...)
    # caps the proposals at one past it, rounded up
    assert proposals == [4, 4, 3, 3, 0, 0, 0, 2, 0, 0, 0, 2]
    assert dec.stats.num_drafts == 6 and dec.stats.num_accepted_tokens == 0
    for _ in range(8):  # all accepted from now on: back to proposing 4
        drafts = dec.propose(s, 10)
        if drafts:
            dec.accept(s, drafts, [*drafts, 0])
    assert len(dec.propose(s, 10)) == 4
    dec.finished(s)
    assert not dec._acceptance


def test_suffix_learns_from_finished_requests():
    prop = SuffixProposer(cache_size=2, min_probability=0.1)
    for i in range(3):
        done = seq([100 + i])
        done.output_token_ids = [40, 41, 42, 43, 44]
        prop.finished(done)
    assert prop.propose(seq([9, 40, 41]), 8) == [42, 43, 44]  # from the global cache
    assert len(prop._recent) == 2                             # bounded
    for _ in range(2):  # evicting all of them empties the global trie
        prop.global_trie.add(prop._recent.popleft(), sign=-1)
    assert prop.global_trie.root.children == {}


def test_cli_flag_reaches_the_config():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--speculative-config",
                            '{"method": "suffix", "num_speculative_tokens": 5}'])
    cfg = EngineConfig.from_args(EngineArgs.from_cli_args(ns).replace(model="m"))
    assert cfg.speculative == SpeculativeConfig(method="suffix", num_speculative_tokens=5)


def test_request_trie_grown_token_by_token_equals_one_built_at_once():
    import random

    from tokenmill.engine.spec_decode.suffix import _RequestTrie, _Trie

    rng = random.Random(0)
    tokens = [rng.randrange(5) for _ in range(300)]
    grown, built = _RequestTrie(), _Trie()
    grown.extend(tokens[:100])
    grown.extend(tokens)
    built.add(tokens)

    def dump(node):
        return {t: (c.count, dump(c)) for t, c in node.children.items()}

    assert dump(grown.root) == dump(built.root)


def test_step_cost_switches_speculation_off_while_it_is_slower():
    from tokenmill.engine.spec_decode.cost import COOLDOWN, PLAIN_EVERY, StepCost

    cost = StepCost()
    allowed = [cost.allows() for _ in range(PLAIN_EVERY)]
    assert allowed == [True] * (PLAIN_EVERY - 1) + [False]  # a plain step to measure
    for _ in range(4):
        cost.record(0.1, 1, speculated=False)   # 0.1 s per token plain
        cost.record(0.3, 4, speculated=True)    # 0.075 s per token speculating
    assert cost.cooldown == 0
    for _ in range(4):
        cost.record(0.3, 2, speculated=True)    # now 0.15 s per token: slower
    assert cost.cooldown == COOLDOWN and cost.num_switched_off == 1
    assert not any(cost.allows() for _ in range(COOLDOWN))
    assert cost.allows()  # tried again
