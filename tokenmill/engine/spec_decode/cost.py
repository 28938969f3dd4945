"""The step-cost off-switch: speculation stays on only while it makes decoding faster.

The engine reports every decode-only step (no prefill rows): its wall time, including
drafting, and how many tokens it produced, and whether it speculated. Moving averages of
seconds per produced token are kept for speculative and for plain steps; a plain step is
forced every ``PLAIN_EVERY`` steps so both stay current. When speculation costs more per
token than plain decoding (after ``MIN_SAMPLES`` of each), it is switched off for
``COOLDOWN`` steps (plain steps keep being measured), then tried again.

Which steps speculate does not change any output (verification is exact); only speed.
"""

from __future__ import annotations

PLAIN_EVERY = 32
MIN_SAMPLES = 4
COOLDOWN = 256
WEIGHT = 0.2


class StepCost:
    def __init__(self) -> None:
        self.spec_cost: float | None = None   # seconds per token, speculative steps
        self.plain_cost: float | None = None  # seconds per token, plain decode steps
        self.samples = [0, 0]                 # (plain, speculative) steps measured
        self.steps = 0
        self.cooldown = 0
        self.num_switched_off = 0

    def allows(self) -> bool:
        """Whether this step may speculate (it asks once per step)."""
        self.steps += 1
        if self.cooldown > 0:
            self.cooldown -= 1
            return False
        return self.steps % PLAIN_EVERY != 0

    def record(self, seconds: float, num_tokens: int, speculated: bool) -> None:
        if num_tokens <= 0:
            return
        cost = seconds / num_tokens
        if speculated:
            self.spec_cost = cost if self.spec_cost is None else (
                (1 - WEIGHT) * self.spec_cost + WEIGHT * cost)
        else:
            self.plain_cost = cost if self.plain_cost is None else (
                (1 - WEIGHT) * self.plain_cost + WEIGHT * cost)
        self.samples[speculated] += 1
        if (min(self.samples) >= MIN_SAMPLES and self.cooldown == 0
                and self.spec_cost > self.plain_cost):
            self.cooldown = COOLDOWN
            self.num_switched_off += 1
            self.samples[1] = 0  # judge afresh when it is back on
            self.spec_cost = None
