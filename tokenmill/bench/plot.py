"""``--plot out.png``: latency CDFs and output throughput over time, in one figure.

Four panels: the empirical CDFs of TTFT, ITL and E2E latency (ms), and output tokens
per second in one-second windows. Drawn with matplotlib's object API on an Agg canvas,
so it needs no display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tokenmill.bench.client import RequestRecord


def _cdf(ax, seconds: list[float], title: str) -> None:
    values = np.sort(np.asarray(seconds, dtype=np.float64) * 1e3)
    if values.size:
        # Steps from (first value, 0) up to (last value, 1).
        xs = np.concatenate([values[:1], values])
        ax.plot(xs, np.arange(values.size + 1) / values.size, drawstyle="steps-post")
        for q, style in ((50, ":"), (90, "--"), (99, "-.")):
            ax.axvline(np.percentile(values, q), color="gray", linestyle=style,
                       linewidth=0.8, label=f"p{q}")
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} CDF")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if title != "ITL" else "fraction of gaps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def save_plot(path: str, records: list[RequestRecord], metrics: dict[str, Any],
              title: str = "") -> None:
    """Writes the figure to ``path`` (the format follows the extension)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from e
    ok = [r for r in records if r.success]
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _cdf(axes[0][0], [r.ttft for r in ok], "TTFT")
    _cdf(axes[0][1], [g for r in ok for g in r.itl], "ITL")
    _cdf(axes[1][0], [r.latency for r in ok], "E2E latency")
    ax = axes[1][1]
    timeline = metrics.get("output_throughput_per_s") or []
    ax.bar(np.arange(len(timeline)), timeline, width=1.0, align="edge")
    ax.axhline(metrics.get("output_throughput", 0.0), color="red", linewidth=1,
               label=f"mean {metrics.get('output_throughput', 0.0):.1f} tok/s")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("Output throughput")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
