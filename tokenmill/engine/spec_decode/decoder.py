"""``SpecDecoder``: who proposes how many tokens each step, and what was accepted.

Proposals are made only where they are expected to pay:

* not for a request whose sampling depends on its own recent tokens in a way the rows
  of one step cannot see (repetition / presence / frequency penalties) or that carries a
  grammar (structured outputs): speculation is simply off for those (their tokens stay
  exact, at today's speed);
* not in a step whose running decodes times ``k + 1`` exceed ``max_batch_rows``: a full
  batch is already compute-bound, and extra rows would slow it;
* not while speculative steps cost more per produced token than plain ones
  (``cost.StepCost``: measured, with plain steps interleaved, re-tried after a while);
* not for a request whose recent acceptance rate (an exponential moving average of
  accepted / proposed) fell below ``min_acceptance``; such a request re-probes once
  every ``probe_interval`` steps, and resumes if the probe is accepted;
* no more tokens than one past the request's recent accepted length (a moving average of
  accepted drafts per proposal, rounded up), so a request whose proposals are accepted only in part
  verifies fewer rows, and one whose proposals are all accepted grows back to
  ``num_speculative_tokens``.

Judging a step (``accept``): row j of a sequence with proposals ``d[0..k-1]`` sampled
``x[j]`` given the tokens up to its position; the kept tokens are ``x[0..a]`` where a is
the number of leading rows with ``x[j] == d[j]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.spec_decode.cost import StepCost
from tokenmill.engine.spec_decode.ngram import NgramProposer
from tokenmill.engine.spec_decode.suffix import SuffixProposer

EMA_WEIGHT = 0.3  # weight of the latest step in the acceptance estimate


class Proposer(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens expected to follow the sequence's tokens."""

    def finished(self, seq: Sequence) -> None:
        """The sequence ended: drop (or learn from) what is kept about it."""


@dataclass
class SpecDecodeStats:
    """Cumulative counters, named as vLLM's ``spec_decode_*`` metrics."""

    num_drafts: int = 0          # proposals verified (one per sequence and step)
    num_draft_tokens: int = 0    # tokens proposed and verified
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: drafts accepted at j

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verified proposal: accepted + the one sampled after."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class _Acceptance:
    length: float       # moving average of accepted drafts per proposal
    rate: float = 1.0   # moving average of accepted / proposed
    paused: int = 0     # steps skipped since the rate fell below the threshold


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, max_model_len: int,
                 proposer: Proposer | None = None) -> None:
        """``proposer``: given for a draft model (which the engine loads); else built
        from ``cfg.method``."""
        self.cfg = cfg
        self.max_model_len = max_model_len
        if proposer is not None:
            self.proposer = proposer
        elif cfg.method == "ngram":
            self.proposer = NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        else:
            self.proposer = SuffixProposer(cfg.suffix_cache_size, cfg.suffix_min_probability)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * cfg.num_speculative_tokens)
        self._acceptance: dict[int, _Acceptance] = {}  # id(sequence) -> its estimate
        self.cost = StepCost()
        self.last_accepted: dict[int, int] = {}  # this step's accepted drafts, by sequence

    def step_allows(self, num_decodes: int) -> bool:
        """The batch-size and step-cost off-switches (called once per step)."""
        return (num_decodes * (self.cfg.num_speculative_tokens + 1) <= self.cfg.max_batch_rows
                and self.cost.allows())

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        p = seq.sampling_params
        return (seq.grammar is None and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty)

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The tokens to verify after the sequence's last token this step (maybe none);
        at most ``max_tokens`` (what the step's budget leaves) and never past the
        request's ``max_tokens`` or the context."""
        return self.propose_all([seq], max_tokens).get(id(seq), [])

    def propose_all(self, seqs: list[Sequence], max_tokens: int) -> dict[int, list[int]]:
        """``propose`` for each sequence, as id(sequence) -> tokens (only those with
        some); a proposer with ``propose_batch`` (the draft model) does them together."""
        wanted = [(s, k) for s in seqs if (k := self._wanted(s, max_tokens)) > 0]
        if not wanted:
            return {}
        batch = getattr(self.proposer, "propose_batch", None)
        if batch is not None:
            return batch(wanted)
        return {id(s): self.proposer.propose(s, k) for s, k in wanted}

    def _wanted(self, seq: Sequence, max_tokens: int) -> int:
        """How many tokens to propose for the sequence this step (0: none)."""
        p = seq.sampling_params
        k = min(self.cfg.num_speculative_tokens, max_tokens,
                self.max_model_len - seq.num_tokens)
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_output_tokens - 1)
        if k <= 0 or not self.eligible(seq):
            return 0
        acc = self._estimate(seq)
        k = min(k, math.ceil(acc.length) + 1)
        if acc.rate < self.cfg.min_acceptance:
            acc.paused += 1
            if acc.paused < self.cfg.probe_interval:
                return 0
            acc.paused = 0  # probe
        return k

    def accept(self, seq: Sequence, drafts: list[int], sampled: list[int]) -> int:
        """How many drafts are accepted given the tokens sampled at the k + 1 rows;
        updates the counters and the sequence's acceptance estimate."""
        a = 0
        while a < len(drafts) and sampled[a] == drafts[a]:
            a += 1
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += len(drafts)
        s.num_accepted_tokens += a
        for j in range(a):
            s.accepted_per_pos[j] += 1
        self.last_accepted[id(seq)] = a
        acc = self._estimate(seq)
        acc.rate = (1 - EMA_WEIGHT) * acc.rate + EMA_WEIGHT * a / len(drafts)
        acc.length = (1 - EMA_WEIGHT) * acc.length + EMA_WEIGHT * a
        return a

    def _estimate(self, seq: Sequence) -> _Acceptance:
        acc = self._acceptance.get(id(seq))
        if acc is None:
            acc = self._acceptance[id(seq)] = _Acceptance(
                length=float(self.cfg.num_speculative_tokens))
        return acc

    def finished(self, seq: Sequence) -> None:
        """A sequence ended: its estimate is dropped; the suffix cache learns its text."""
        self._acceptance.pop(id(seq), None)
        self.proposer.finished(seq)
