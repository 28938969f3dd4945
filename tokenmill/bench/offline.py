"""What ``bench throughput`` and ``bench latency`` share: the engine and the prompts.

Both run the engine in-process on random token-id prompts, so no tokenizer is loaded
(``skip_tokenizer_init``) and a model folder without one (or ``--load-format dummy``)
works. Ids are drawn from ``[min(100, vocab // 4), vocab)`` to stay clear of the
special tokens that sit at the low end of most vocabularies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from typing import Any

import numpy as np

from tokenmill.engine_args import EngineArgs


def check_positive(a: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(a, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def build_llm(a: argparse.Namespace, needed_len: int):
    """The engine from the standard engine flags; checks that prompts plus outputs of
    ``needed_len`` tokens fit in its context."""
    from tokenmill.entrypoints.llm import LLM

    args = EngineArgs.from_cli_args(a).replace(skip_tokenizer_init=True)
    llm = LLM(**dataclasses.asdict(args))
    if needed_len > llm.engine.max_model_len:
        raise ValueError(f"--input-len + --output-len is {needed_len} tokens, more than the "
                         f"engine's context of {llm.engine.max_model_len}; lower them, or "
                         "raise --max-model-len / --kv-cache-memory.")
    return llm


def random_token_prompts(n: int, length: int, vocab: int, rng: random.Random
                         ) -> list[list[int]]:
    low = min(100, vocab // 4)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


def ms_stats(seconds: list[float]) -> dict[str, float]:
    """Mean, p50 and p90 in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90))}


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
