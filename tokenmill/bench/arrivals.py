"""When each request of a serving benchmark is sent.

``--request-rate inf`` sends everything at time 0 (``--max-concurrency`` then decides
how many are in flight). A finite rate draws the gaps between arrivals from a gamma
distribution with mean ``1/rate``: shape ``burstiness`` 1 is a Poisson process
(exponential gaps); below 1 the arrivals come in bursts, above 1 more evenly spaced.
A seeded ``random.Random`` makes the schedule reproducible.
"""

from __future__ import annotations

import math
import random


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Seconds after the start at which each of ``n`` arrivals happens (non-decreasing).
    The first arrival is at 0."""
    if n < 0:
        raise ValueError(f"the number of arrivals must be >= 0, got {n}.")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}.")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}.")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)  # gamma mean = shape * scale = 1/rate
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        offsets.append(t)
    return offsets
