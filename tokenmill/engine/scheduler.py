"""A phase-less token-budget scheduler (the vLLM v1 design).

Each step has a budget of ``max_num_batched_tokens``. Running requests are served first,
in order, each asking for ``num_tokens - num_computed_tokens`` tokens (1 for a decode, the
rest of the prompt for a prefill in progress), capped by what is left of the budget: this
is chunked prefill, and it lets one step mix prefill chunks with decodes. Then waiting
requests are admitted, in (priority, arrival) order, while budget, ``max_num_seqs`` and
free blocks last.

When a running request needs a block and none is free, the scheduler preempts: it takes
the running request with the lowest priority (the highest ``priority`` value), latest
arrival first, frees all its blocks and puts it back at the head of the waiting queue.
When it is admitted again it recomputes its prompt and the tokens it had generated
(recompute preemption): nothing is lost, only work is repeated. A step that preempted
admits no new request, so the pool is not immediately oversubscribed again.

Failure isolation: when a step raises (the model, the sampler, a grammar), the engine hands
its sequences to ``isolate()``: each is preempted by recompute and marked *suspect*. While
suspects remain, a step schedules one suspect and nothing else (preempting others if it
needs their blocks), until it has sampled a token alone: then it is cleared. A suspect
that fails alone is the one whose data broke the step; the engine ends it with an error.

Speculative decoding (a ``SpecDecoder`` given): a running decode may get proposed tokens
after its last one, as extra query rows counted in the budget. Its blocks are grown for
them only if the pool has room without preempting anyone; otherwise it decodes plainly.
Only the last real token counts as computed after the step; the engine adds the accepted
proposals (``accept_spec``), which also frees blocks that held only rejected ones.
"""

from __future__ import annotations

import bisect

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.engine.spec_decode import SpecDecoder

STARVATION_STEPS = 32  # lpm: a request waiting this many steps is served in arrival order


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int,
                 spec: SpecDecoder | None = None) -> None:
        self.config = config
        self.spec = spec
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key()
        self.running: list[Sequence] = []
        self.suspects: list[Sequence] = []  # isolated after a failed step, in order
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------
    def add_request(self, request: Sequence) -> None:
        """Queues a request. The caller has checked its length against max_model_len."""
        request.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, request, key=Sequence.sort_key)

    def finish_request(self, request: Sequence, status: SequenceStatus) -> None:
        """Ends a request (stop, length or abort) and frees its blocks at once."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.blocks.free(request)
        self._clear_suspect(request)
        if self.spec is not None:
            self.spec.finished(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- the step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.suspects:
            return self._schedule_suspect(self.suspects[0])
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[int, ScheduledSequence] = {}  # id(request) -> its share
        proposals: dict[int, list[int]] = {}  # id(request) -> its proposed tokens
        if self.spec is not None:
            decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
            if self.spec.step_allows(len(decodes)):
                proposals = self.spec.propose_all(decodes, budget - 1)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # cannot happen for a running request; never spin on it
                i += 1
                continue
            drafts = self._fit(req, proposals.get(id(req)), budget) if num_new == 1 else []
            if drafts:
                scheduled[id(req)] = ScheduledSequence(req, 1 + len(drafts), drafts)
                budget -= 1 + len(drafts)
                i += 1
                continue
            while not self.blocks.allocate_slots(req, num_new):
                victim = max(self.running, key=Sequence.sort_key)
                if victim is not req and self.running.index(victim) < i:
                    i -= 1  # the list shifts left under us
                budget += self._preempt(victim, scheduled.pop(id(victim), None), out)
                if victim is req:
                    break
            else:
                scheduled[id(req)] = ScheduledSequence(req, num_new)
                budget -= num_new
                i += 1

        if not out.preempted:
            self._admit_waiting(budget, scheduled)
        out.scheduled = list(scheduled.values())
        return out

    def _fit(self, req: Sequence, drafts: list[int] | None, budget: int) -> list[int]:
        """A decode's proposed tokens, cut to what the budget leaves, with their slots
        allocated; [] if none, or if the pool has no room for them without preempting."""
        drafts = (drafts or [])[: budget - 1]
        if drafts and not self.blocks.allocate_slots(req, 1 + len(drafts)):
            return []
        return drafts

    def accept_spec(self, request: Sequence, num_accepted: int) -> None:
        """After the engine appended a speculative decode's kept tokens: the accepted
        proposals' K/V is valid (computed); blocks that held only rejected ones are freed,
        and newly complete blocks are published to the prefix cache."""
        if request.is_finished:
            return
        request.num_computed_tokens += num_accepted
        self.blocks.trim(request, request.num_tokens)
        self.blocks.cache_full_blocks(request)

    def _admit_waiting(self, budget: int, scheduled: dict[int, ScheduledSequence]) -> None:
        """Admits waiting requests in policy order while budget, seats and blocks last.

        ``fcfs``: (priority, arrival). ``lpm`` (longest prefix match): among equal
        priorities, the request with the most cached tokens first, so that requests
        sharing a prefix run while it is cached; a request that has waited
        ``STARVATION_STEPS`` steps goes back to arrival order. A sibling of an ``n > 1``
        request waits until the first sibling has computed the prompt's full blocks, then
        finds them in the prefix cache instead of computing its own copy. A request
        whose grammar (structured outputs) is still compiling waits; others go ahead."""
        hits: dict[int, list[int]] = {}

        def hit(r: Sequence) -> list[int]:
            if id(r) not in hits:
                hits[id(r)] = self.blocks.match_prefix(r) if r.num_computed_tokens == 0 else []
            return hits[id(r)]

        order = list(self.waiting)
        if self.config.scheduling_policy == "lpm":
            order.sort(key=lambda r: (r.priority, r.waiting_steps < STARVATION_STEPS,
                                      -len(hit(r)), r.arrival_time))
        for r in self.waiting:
            r.waiting_steps += 1
        for req in order:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self._sibling_computing_prompt(req):
                continue
            if req.grammar is not None and not req.grammar.ready():
                continue
            hit_blocks = hit(req)
            hit_tokens = len(hit_blocks) * self.blocks.block_size
            remaining = req.num_tokens - req.num_computed_tokens - hit_tokens
            if not self.config.enable_chunked_prefill and remaining > budget:
                # Without chunking a prompt goes in whole; one larger than the budget
                # may still go alone in an otherwise empty step.
                if scheduled or remaining <= self.config.max_num_batched_tokens:
                    break
                budget = remaining
            num_new = min(remaining, budget)
            if not self.blocks.allocate_slots(req, num_new, hit_blocks):
                break
            self.blocks.record_admission(req, hit_tokens)
            self.waiting.remove(req)
            req.status = SequenceStatus.RUNNING
            self.running.append(req)
            scheduled[id(req)] = ScheduledSequence(req, num_new)
            budget -= num_new

    def _sibling_computing_prompt(self, req: Sequence) -> bool:
        first = req.first_sibling
        if first is None or self.blocks.prefix_cache is None or first.is_finished:
            return False
        full = req.num_prompt_tokens // self.blocks.block_size * self.blocks.block_size
        return first.num_computed_tokens < full

    def _preempt(self, victim: Sequence, share: ScheduledSequence | None,
                 out: SchedulerOutput) -> int:
        """Frees the victim's blocks and requeues it; returns the budget it gives back."""
        self.running.remove(victim)
        self.blocks.free(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add_request(victim)
        victim.status = SequenceStatus.PREEMPTED
        out.preempted.append(victim)
        return share.num_new_tokens if share else 0

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Marks the scheduled tokens as computed (their K/V is now in the cache) and
        publishes newly completed blocks to the prefix cache. A suspect that sampled (it
        ran alone) is cleared."""
        for s in out.scheduled:
            sampled = s.samples
            s.request.num_computed_tokens += s.num_new_tokens - len(s.spec_token_ids)
            self.blocks.cache_full_blocks(s.request)
            if sampled and s.request.suspect:
                self._clear_suspect(s.request)

    # ---- failure isolation ------------------------------------------------------------
    def isolate(self, requests: list[Sequence]) -> None:
        """The sequences of a step that raised: each is preempted (its blocks freed, to be
        recomputed) and becomes a suspect, to run alone."""
        for r in requests:
            if r.is_finished:
                continue
            if r in self.running:
                self.running.remove(r)
            elif r in self.waiting:
                self.waiting.remove(r)
            self.blocks.free(r)
            r.num_computed_tokens = 0
            self.add_request(r)
            r.status = SequenceStatus.PREEMPTED
            if not r.suspect:
                r.suspect = True
                self.suspects.append(r)

    def _clear_suspect(self, request: Sequence) -> None:
        if request.suspect:
            request.suspect = False
            self.suspects.remove(request)

    def _schedule_suspect(self, req: Sequence) -> SchedulerOutput:
        """A step of one suspect alone: admitted if it waits, other running sequences
        preempted if it needs their blocks."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        hit_blocks: list[int] = []
        if req in self.waiting:
            if req.grammar is not None and not req.grammar.ready():
                return out  # cannot happen (it ran before); the engine checks grammars
            if req.num_computed_tokens == 0:
                hit_blocks = self.blocks.match_prefix(req)
        hit_tokens = len(hit_blocks) * self.blocks.block_size
        remaining = req.num_tokens - req.num_computed_tokens - hit_tokens
        num_new = remaining if not self.config.enable_chunked_prefill else min(remaining,
                                                                                 budget)
        while not self.blocks.allocate_slots(req, num_new, hit_blocks):
            others = [r for r in self.running if r is not req]
            if not others:
                return out
            self._preempt(max(others, key=Sequence.sort_key), None, out)
        if req in self.waiting:
            self.blocks.record_admission(req, hit_tokens)
            self.waiting.remove(req)
            req.status = SequenceStatus.RUNNING
            self.running.append(req)
        out.scheduled = [ScheduledSequence(req, num_new)]
        return out

    def check_integrity(self) -> None:
        """The block invariants, over every live request."""
        live = self.running + self.waiting
        self.blocks.check_integrity(live)
        for r in self.waiting:
            if r.block_ids:  # preemption frees everything
                raise AssertionError(f"waiting request {r.request_id} holds blocks")
