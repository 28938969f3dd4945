"""Data-parallel routing: cache-aware against round-robin on a shared-prefix workload, and
two replicas against one on a plain random workload. Not a test: run it on a quiet machine.

    python benchmarks/dp_routing.py                        # the issue's setting (~minutes)
    python benchmarks/dp_routing.py --tiny                 # a quick check that it runs
    python benchmarks/dp_routing.py --result-json out.json

Shared-prefix workload: ``--groups`` groups, each a ``--prefix-tokens`` random-token prefix,
``--requests`` requests in random order, each its group's prefix plus ``--suffix-tokens``
fresh tokens, ``--concurrency`` in flight, ``--max-tokens`` generated. Prompts are sent as
token ids (``/v1/completions`` accepts them), so their lengths are exact. Each replica's
KV pool (``--kv-cache-memory``) is sized to hold about half the groups' prefixes: round-robin
sends every group to both replicas, which then evict each other's prefixes; cache-aware
keeps each group on one replica. Reported per policy: the prefix hit rate (prompt tokens
found in the prefix cache, from ``/metrics``, over what a perfect cache could reuse: the
whole KV blocks of the shared prefix on every request but its group's first; the share of
all prompt tokens is printed too) and p50 / p90 time to first token (first streamed chunk).
Targets: cache-aware's prefix hit rate >= 85 % and >= 1.5x round-robin's, its p50 TTFT
<= 0.5x round-robin's.

Random workload: ``--random-requests`` prompts of random tokens (no shared prefix), DP=2
(one thread per replica, pinned) against DP=1 (one engine with every core's threads):
requests/s and output tokens/s. On a 2-core machine expect about even: two single-thread
engines and one two-thread engine have the same cores; DP wins where one engine cannot
use its cores well (small batches), loses where a bigger batch amortizes the weights.

Default ``--kv-cache-memory``: SmolLM2-135M (the embedded model) caches 30 layers x 3 KV
heads x 64 x 2 (K, V) x 2 bytes = 22.5 KiB per token, so 8 prefixes of 1,500 tokens are
~264 MiB; 300 MiB leaves room for the running requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        self.log = tempfile.NamedTemporaryFile(prefix="dp-routing-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "serve", *args, "--port", str(self.port),
             "--disable-access-log", "--uvicorn-log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; log: {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready; log: {self.log.name}")
            time.sleep(0.5)

    def prefix_cache(self) -> tuple[float, float]:
        """(queried, hit) prompt tokens, summed over replicas."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = {}
        for name in ("prefix_cache_queries_total", "prefix_cache_hits_total"):
            total[name] = sum(float(v) for v in re.findall(
                rf"^tokenmill:{name}\{{[^}}]*\}} (\S+)$", text, re.M))
        return total["prefix_cache_queries_total"], total["prefix_cache_hits_total"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.log.name)


async def run_workload(url: str, prompts: list[list[int]], max_tokens: int,
                       concurrency: int) -> dict:
    ttfts: list[float] = []
    out_tokens = 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt: list[int]) -> None:
            nonlocal out_tokens
            async with sem:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                start = time.perf_counter()
                first = None
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            if first is None:
                                first = time.perf_counter() - start
                            out_tokens += 1  # one chunk per generated token
                ttfts.append(first if first is not None else float("nan"))

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    ttfts.sort()
    return {"requests": len(prompts), "wall_s": wall, "req_per_s": len(prompts) / wall,
            "out_tok_per_s": out_tokens / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))]}


def shared_prefix_prompts(a, rng: random.Random) -> list[list[int]]:
    prefixes = [[rng.randrange(100, 40000) for _ in range(a.prefix_tokens)]
                for _ in range(a.groups)]
    prompts = [prefixes[i % a.groups] + [rng.randrange(100, 40000)
                                         for _ in range(a.suffix_tokens)]
               for i in range(a.requests)]
    rng.shuffle(prompts)
    return prompts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix-tokens", type=int, default=1500)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--kv-cache-memory", default="300MiB",
                   help="per replica: about half the groups' prefixes (see the doc)")
    p.add_argument("--random-requests", type=int, default=64)
    p.add_argument("--random-prompt-tokens", type=int, default=256)
    p.add_argument("--random-max-tokens", type=int, default=32)
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="a small setting that only checks the script runs")
    p.add_argument("--result-json", default=None)
    a = p.parse_args()
    if a.tiny:
        a.groups, a.prefix_tokens, a.requests, a.max_tokens = 4, 96, 16, 2
        a.kv_cache_memory, a.random_requests, a.random_max_tokens = "6MiB", 8, 4
        a.random_prompt_tokens = 32
    max_len = str(max(a.prefix_tokens + a.suffix_tokens + a.max_tokens,
                      a.random_prompt_tokens + a.random_max_tokens) + 16)
    common = ("--max-model-len", max_len, "--max-num-seqs", str(max(8, a.concurrency)))
    result: dict = {"args": vars(a)}

    prompts = shared_prefix_prompts(a, random.Random(a.seed))
    # what a perfect cache could reuse: the whole-block part of each group's prefix, on
    # every request but the group's first
    block = 16
    reusable = (a.requests - min(a.groups, a.requests)) * (a.prefix_tokens // block * block)
    for policy in ("cache_aware", "round_robin"):
        server = Server("--data-parallel-size", "2", "--routing-policy", policy,
                        "--kv-cache-memory", a.kv_cache_memory, *common, threads=1)
        try:
            q0, h0 = server.prefix_cache()
            r = asyncio.run(run_workload(server.url, prompts, a.max_tokens, a.concurrency))
            q1, h1 = server.prefix_cache()
        finally:
            server.stop()
        r["prompt_token_hit_rate"] = (h1 - h0) / max(1.0, q1 - q0)
        r["prefix_hit_rate"] = (h1 - h0) / reusable
        result[f"shared_prefix_{policy}"] = r
        print(f"shared prefix, DP=2, {policy:12s}: prefix hit rate "
              f"{r['prefix_hit_rate']:.1%} (all prompt tokens {r['prompt_token_hit_rate']:.1%}), "
              f"TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, p90 {r['ttft_p90_s'] * 1e3:.0f} ms, "
              f"{r['req_per_s']:.2f} req/s", flush=True)
    ca, rr = result["shared_prefix_cache_aware"], result["shared_prefix_round_robin"]
    checks = {
        "hit rate >= 85%": ca["prefix_hit_rate"] >= 0.85,
        "hit rate >= 1.5x round robin": ca["prefix_hit_rate"]
        >= 1.5 * rr["prefix_hit_rate"],
        "p50 TTFT <= 0.5x round robin": ca["ttft_p50_s"] <= 0.5 * rr["ttft_p50_s"],
    }

    rng = random.Random(a.seed + 1)
    randoms = [[rng.randrange(100, 40000) for _ in range(a.random_prompt_tokens)]
               for _ in range(a.random_requests)]
    for dp, threads in ((2, max(1, a.cores // 2)), (1, a.cores)):
        server = Server("--data-parallel-size", str(dp), "--kv-cache-memory", "256MiB",
                        *common, threads=threads)
        try:
            r = asyncio.run(run_workload(server.url, randoms, a.random_max_tokens,
                                         max(a.concurrency, 8)))
        finally:
            server.stop()
        result[f"random_dp{dp}"] = r
        print(f"random, DP={dp} x {threads} thread(s): {r['req_per_s']:.2f} req/s, "
              f"{r['out_tok_per_s']:.1f} output tok/s, TTFT p50 "
              f"{r['ttft_p50_s'] * 1e3:.0f} ms", flush=True)
    result["checks"] = checks
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  cache_aware {name}")
    if a.result_json:
        with open(a.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
