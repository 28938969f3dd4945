"""What the scheduler decides for one step, as the model runner reads it: which sequences
compute how many new positions, and which were preempted."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.sequence import Sequence


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: compute positions
    ``[num_computed_tokens, num_computed_tokens + num_new_tokens)``. With speculative
    decoding, a decode's share ends with ``spec_token_ids``: proposed tokens after its
    last one (counted in ``num_new_tokens``), each row verified by the sampler."""

    request: Sequence
    num_new_tokens: int
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so the model's output
        at the last known position is the next token."""
        r = self.request
        return (r.num_computed_tokens + self.num_new_tokens - len(self.spec_token_ids)
                == r.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled
