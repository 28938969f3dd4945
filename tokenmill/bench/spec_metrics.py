"""Speculative decoding's acceptance over a benchmark run, from the server's /metrics.

The ``tokenmill:spec_decode_*`` counters (vLLM's names under our prefix) are read before
and after the run; their differences give the run's acceptance rate (accepted / proposed
tokens) and mean accepted length (tokens produced per verified proposal: 1 + accepted /
drafts), as ``vllm bench serve`` reports them. A server without the counters (speculation
off, or another engine) gives nothing.
"""

from __future__ import annotations

import re
from typing import Any

_COUNTER = re.compile(r'^tokenmill:spec_decode_(num_drafts|num_draft_tokens|'
                      r'num_accepted_tokens)_total\{[^}]*\}\s+([0-9.eE+-]+)$', re.MULTILINE)


def spec_counters(metrics_text: str) -> dict[str, float]:
    """The spec-decode counters in a Prometheus exposition, summed over models."""
    out: dict[str, float] = {}
    for name, value in _COUNTER.findall(metrics_text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def engine_spec_counters(llm: Any) -> dict[str, float]:
    """The same counters, read from an offline ``LLM``'s engine ({} when speculation is
    off)."""
    spec = llm.engine.spec
    if spec is None:
        return {}
    s = spec.stats
    return {"num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens}


def spec_line(summary: dict[str, Any]) -> str:
    """One line for a report, or "" without figures."""
    if not summary:
        return ""
    return (f"Speculative decoding: acceptance rate "
            f"{100 * summary['spec_decode_acceptance_rate']:.1f}%, mean accepted length "
            f"{summary['spec_decode_mean_accepted_length']:.2f}")


def spec_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The run's acceptance figures, or {} when the counters are absent or no proposal
    was verified."""
    if not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    drafts, proposed = d.get("num_drafts", 0.0), d.get("num_draft_tokens", 0.0)
    accepted = d.get("num_accepted_tokens", 0.0)
    if not drafts or not proposed:
        return {}
    return {"spec_decode_num_drafts": int(drafts),
            "spec_decode_num_draft_tokens": int(proposed),
            "spec_decode_num_accepted_tokens": int(accepted),
            "spec_decode_acceptance_rate": accepted / proposed,
            "spec_decode_mean_accepted_length": 1 + accepted / drafts}
