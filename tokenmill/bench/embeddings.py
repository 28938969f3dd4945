"""``tokenmill bench serve --endpoint embeddings``: throughput and latency of
``/v1/embeddings`` on any OpenAI-compatible server (tokenmill, vLLM, llama-server).

``--num-prompts`` inputs of ``--input-len`` random words each are sent in requests of
``--embed-batch`` inputs, at most ``--max-concurrency`` requests in flight (all at once
when unset). Reported: inputs/s and tokens/s over the wall time of the run (tokens from
each response's ``usage.prompt_tokens``), and request latency percentiles. One warm-up
request goes first and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import numpy as np

from tokenmill.bench.client import BenchClient
from tokenmill.bench.datasets import random_words


def embedding_inputs(num: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [random_words(rng, words) for _ in range(num)]


async def run_embeddings(client: BenchClient, model: str, inputs: list[str], batch: int,
                         concurrency: int | None) -> dict[str, Any]:
    """Sends ``inputs`` in requests of ``batch``; returns the summary."""
    await client.post("/v1/embeddings", {"model": model, "input": inputs[:batch]})
    gate = asyncio.Semaphore(concurrency or len(inputs))
    latencies: list[float] = []
    tokens = 0

    async def one(chunk: list[str]) -> None:
        nonlocal tokens
        async with gate:
            t = time.perf_counter()
            body = await client.post("/v1/embeddings", {"model": model, "input": chunk,
                                                        "encoding_format": "float"})
            latencies.append(time.perf_counter() - t)
            if len(body.get("data", [])) != len(chunk):
                raise ValueError("the server returned a different number of embeddings")
            tokens += int((body.get("usage") or {}).get("prompt_tokens", 0))

    start = time.perf_counter()
    await asyncio.gather(*(one(inputs[i:i + batch]) for i in range(0, len(inputs), batch)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"inputs": len(inputs), "requests": len(latencies), "duration_s": wall,
            "inputs_per_s": len(inputs) / wall, "tokens_per_s": tokens / wall,
            "total_tokens": tokens,
            **{f"p{q}_latency_ms": float(np.percentile(lat, q)) for q in (50, 90, 99)}}


def format_embeddings(summary: dict[str, Any]) -> str:
    return "\n".join([
        f"{'inputs':<24}{summary['inputs']}  ({summary['requests']} requests)",
        f"{'duration (s)':<24}{summary['duration_s']:.2f}",
        f"{'inputs/s':<24}{summary['inputs_per_s']:.1f}",
        f"{'tokens/s':<24}{summary['tokens_per_s']:.1f}",
        *(f"{f'latency p{q} (ms)':<24}{summary[f'p{q}_latency_ms']:.1f}" for q in (50, 90, 99)),
    ])


def cmd_bench_embeddings(a: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with BenchClient(a.base_url, a.api_key, a.timeout) as client:
            model = a.model or await client.first_model()
            inputs = embedding_inputs(a.num_prompts, a.input_len, a.seed)
            return await run_embeddings(client, model, inputs, a.embed_batch,
                                        a.max_concurrency)

    summary = asyncio.run(main())
    print(format_embeddings(summary))
    if a.result_json:
        with open(a.result_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0
