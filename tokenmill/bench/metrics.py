"""From per-request records to the numbers a serving benchmark reports.

Throughputs divide by the benchmark's duration (first send to last response). Latency
percentiles use linear interpolation (``numpy.percentile``), over successful requests;
ITL pools the gaps of all requests. Goodput counts the requests that met every service
level objective given with ``--slo`` (TTFT, TPOT, E2E, in ms), per second. The prefix
cache hit rate is ``sum(cached_tokens) / sum(prompt_tokens)`` over the requests whose
server reported ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokenmill.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    if not text:
        return {}
    slos: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"--slo takes metric=milliseconds pairs separated by commas, "
                             f"metrics {', '.join(SLO_METRICS)}; got {item!r}.")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo {key} must be a number of milliseconds, "
                             f"got {value!r}.") from None
        if not ms > 0:
            raise ValueError(f"--slo {key} must be > 0 ms, got {value!r}.")
        slos[SLO_METRICS[key]] = ms
    return slos


def _ms_stats(name: str, seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    out = {f"mean_{name}_ms": float(values.mean()) if values.size else 0.0}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = float(np.percentile(values, q)) if values.size else 0.0
    return out


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    got = {"ttft": r.ttft * 1e3, "tpot": r.tpot * 1e3, "e2el": r.latency * 1e3}
    return r.success and all(got[k] <= v for k, v in slos.items())


def throughput_timeline(records: list[RequestRecord], bucket_s: float = 1.0) -> list[float]:
    """Output tokens per second in consecutive ``bucket_s`` windows from the start.
    A request's tokens are spread evenly over its chunks (a chunk may hold several)."""
    times, weights = [], []
    for r in records:
        if not r.success:
            continue
        per_chunk = r.completion_tokens / len(r.token_times)
        times += [r.start + t for t in r.token_times]
        weights += [per_chunk] * len(r.token_times)
    if not times:
        return []
    n = max(1, math.ceil(max(times) / bucket_s))
    counts, _ = np.histogram(times, bins=n, range=(0.0, n * bucket_s), weights=weights)
    return [float(c) / bucket_s for c in counts]


def summarize(records: list[RequestRecord], duration: float,
              slos: dict[str, float] | None = None,
              expected_output_len: int | None = None) -> dict[str, Any]:
    """All metrics of one run, as a flat JSON-friendly dict (vLLM's key names where
    they exist)."""
    ok = [r for r in records if r.success]
    duration = max(duration, 1e-9)
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.completion_tokens for r in ok)
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "mean_input_len": total_in / len(ok) if ok else 0.0,
        "mean_output_len": total_out / len(ok) if ok else 0.0,
        "input_len_measured": bool(ok) and all(r.prompt_tokens is not None for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    m.update(_ms_stats("ttft", [r.ttft for r in ok]))
    m.update(_ms_stats("tpot", [r.tpot for r in ok if r.completion_tokens > 1]))
    m.update(_ms_stats("itl", [gap for r in ok for gap in r.itl]))
    m.update(_ms_stats("e2el", [r.latency for r in ok]))
    timeline = throughput_timeline(records)
    m["output_throughput_per_s"] = timeline
    m["peak_output_throughput"] = max(timeline, default=0.0)
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        m["slo_ms"] = dict(slos)
        m["goodput"] = good / duration
        m["slo_attainment"] = good / len(records) if records else 0.0
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    if reported:
        cached = sum(r.cached_tokens or 0 for r in reported)
        prompt = sum(r.prompt_tokens or 0 for r in reported)
        m["total_cached_tokens"] = cached
        m["prefix_cache_hit_rate"] = cached / prompt
    if expected_output_len is not None:
        m["num_output_len_mismatch"] = sum(r.completion_tokens != expected_output_len
                                           for r in ok)
    errors = [r.error for r in records if not r.success]
    if errors:
        m["first_error"] = errors[0]
    return m
