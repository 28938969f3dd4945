"""Printing and saving a serving benchmark's results."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from tokenmill.bench.client import RequestRecord

_WIDTH = 50


def _rule(title: str = "", fill: str = "-") -> str:
    return title.center(_WIDTH, fill)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value!s:<10}"


def format_summary(m: dict[str, Any]) -> str:
    """A text table in the layout of ``vllm bench serve``."""
    lines = [_rule(" Serving Benchmark Result ", "="),
             _row("Successful requests:", m["completed"]),
             _row("Failed requests:", m["failed"]),
             _row("Benchmark duration (s):", m["duration_s"]),
             _row("Total input tokens:", m["total_input_tokens"]),
             _row("Total generated tokens:", m["total_output_tokens"]),
             _row("Mean input length (tokens):", m["mean_input_len"])
             + ("" if m["input_len_measured"] else " (estimated: no usage)"),
             _row("Mean output length (tokens):", m["mean_output_len"]),
             _row("Request throughput (req/s):", m["request_throughput"]),
             _row("Output token throughput (tok/s):", m["output_throughput"]),
             _row("Peak output token throughput (tok/s):", m["peak_output_throughput"]),
             _row("Total token throughput (tok/s):", m["total_token_throughput"])]
    if "goodput" in m:
        slo = ", ".join(f"{k}<={v:g}" for k, v in m["slo_ms"].items())
        lines.append(_row("SLOs (ms):", slo))
        lines.append(_row("Goodput (req/s):", m["goodput"]))
        lines.append(_row("SLO attainment (%):", 100 * m["slo_attainment"]))
    if "prefix_cache_hit_rate" in m:
        lines.append(_row("Prefix cache hit rate (%):", 100 * m["prefix_cache_hit_rate"]))
    if "spec_decode_acceptance_rate" in m:
        lines.append(_row("Spec decode acceptance rate (%):",
                          100 * m["spec_decode_acceptance_rate"]))
        lines.append(_row("Spec decode mean accepted length:",
                          m["spec_decode_mean_accepted_length"]))
    for key, title in (("ttft", "Time to First Token"),
                       ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"),
                       ("e2el", "End-to-end Latency")):
        lines.append(_rule(title))
        lines.append(_row(f"Mean {key.upper()} (ms):", m[f"mean_{key}_ms"]))
        for q in (50, 90, 99):
            lines.append(_row(f"P{q} {key.upper()} (ms):", m[f"p{q}_{key}_ms"]))
    lines.append("=" * _WIDTH)
    if m.get("num_output_len_mismatch"):
        lines.append(f"warning: {m['num_output_len_mismatch']} requests did not generate "
                     "--output-len tokens; is EOS banned (--ban-token-ids) or ignored?")
    if m.get("first_error"):
        lines.append(f"first error: {m['first_error']}")
    return "\n".join(lines)


def write_result_json(path: str, config: dict[str, Any], metrics: dict[str, Any],
                      records: list[RequestRecord]) -> None:
    """Writes ``{"date", "config", "metrics", "requests"}``; creates the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "config": config, "metrics": metrics,
           "requests": [r.to_json() for r in records]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
