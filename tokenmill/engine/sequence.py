"""The state of one sequence being generated.

A request is phase-less: it has ``num_tokens`` (prompt + generated so far) and
``num_computed_tokens`` (how many of those have K/V in the cache). Each step the scheduler
lets ``num_computed_tokens`` catch up by some amount; when it reaches ``num_tokens`` the
model samples one more token. A prefill, a prefill chunk, a decode and a recompute after
preemption are all the same thing: catching up.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tokenmill.outputs import PositionLogprobs, RequestMetrics
from tokenmill.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed (vLLM's "error"); stop_reason holds why

    @property
    def is_finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Sequence:
    """One sequence. For ``n > 1`` the engine creates n of these (one per completion),
    each with ``parent_id`` pointing at the user's request id and its ``index``."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None
    index: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_published_blocks: int = 0   # leading blocks already entered in the prefix cache
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission
    waiting_steps: int = 0          # scheduling rounds spent waiting (lpm starvation guard)
    first_sibling: Sequence | None = None  # for n > 1: sequence 0 of the same user request
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # in a step that raised: runs alone until it has sampled a token alone (scheduler)
    suspect: bool = False
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    generator: torch.Generator | None = None
    detokenizer: object | None = None  # tokenmill.tokenizer.IncrementalDetokenizer
    grammar: object | None = None      # tokenmill.structured.RequestGrammar, if constrained
    metrics: RequestMetrics = None  # type: ignore[assignment]
    # the request's logit_bias as (token ids, values), built once per user request and
    # shared by its n sequences (built here when not given)
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None
    spec_state: object | None = None  # the speculative proposer's index of its tokens

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)
        if self.logit_bias is None:
            self.logit_bias = logit_bias_tensors(self.sampling_params)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[
            position - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while some prompt positions still need their logprobs computed."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)


def logit_bias_tensors(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``params.logit_bias`` as (token ids, values) tensors, or None."""
    bias = params.logit_bias
    if not bias:
        return None
    return (torch.tensor(list(bias.keys()), dtype=torch.long),
            torch.tensor(list(bias.values()), dtype=torch.float32))
