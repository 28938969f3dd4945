"""Embeddings throughput: tokenmill against llama-server on the nomic-embed GGUF, and
against sentence-transformers on all-MiniLM-L6-v2, interleaved in the same run.

    python benchmarks/embeddings_compare.py --llama-server /path/to/llama-server
        [--rounds 3] [--num-inputs 256] [--threads N] [--quick]

1. nomic-embed-text-v1.5 F16 GGUF: ``tokenmill serve`` (float32, and with
   ``--quantization q8_0``) and ``llama-server --embedding --pooling mean`` (F16 as
   stored) on the same file and threads, each sent --num-inputs random-word
   inputs of ~64 and of ~500 tokens through ``/v1/embeddings`` (32 inputs a request,
   4 requests in flight, the same client: ``tokenmill.bench.embeddings``). Target:
   tokenmill >= 1.5x llama-server's inputs/s.
2. all-MiniLM-L6-v2: tokenmill's ``EmbeddingEngine`` (float32, and with
   ``--quantization q8_0``: the layers' matrices on the packed Q8_0 kernels) and
   ``SentenceTransformer.encode`` (batch 32) in this process, ~64- and ~250-token inputs
   (its limit is 256). Target: >= 2x sentence-transformers' inputs/s.

Each round runs every contender once per input length, alternating; the best round of
each is reported (and every round is printed). Run on a quiet machine. --quick is a
smoke run (8 inputs, 1 round) to check the script works. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from tokenmill.bench.client import BenchClient
from tokenmill.bench.embeddings import embedding_inputs, run_embeddings
from tokenmill.engine.embedding_engine import EmbeddingEngine, EmbeddingEngineConfig
from tokenmill.loader.pypi_models import fetch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], url: str, name: str):
    log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); log: {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in 300 s; log: {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


async def _http_run(url: str, inputs: list[str]) -> dict:
    async with BenchClient(url, timeout=3600) as client:
        model = await client.first_model()
        return await run_embeddings(client, model, inputs, batch=32, concurrency=4)


def nomic_part(args, rounds: int, n: int) -> None:
    gguf = str(fetch("nomic-embed-text-v1.5-f16"))
    env_threads = ["--threads", str(args.threads)]
    tm_port, ll_port = _port(), _port()
    q8_port = _port()
    servers = {"tokenmill": [sys.executable, "-m", "tokenmill", "serve", gguf, "--port",
                             str(tm_port), "--disable-access-log"],
               "tokenmill-q8_0": [sys.executable, "-m", "tokenmill", "serve", gguf, "--port",
                                  str(q8_port), "--disable-access-log", "--quantization",
                                  "q8_0"]}
    if args.llama_server:
        servers["llama-server"] = [args.llama_server, "-m", gguf, "--embedding", "--pooling",
                                   "mean", "--port", str(ll_port), *env_threads,
                                   "-c", "16384", "-np", "8", "-b", "4096", "-ub", "4096"]
    else:
        print("(no --llama-server: tokenmill alone)")
    urls = {"tokenmill": f"http://127.0.0.1:{tm_port}",
            "tokenmill-q8_0": f"http://127.0.0.1:{q8_port}",
            "llama-server": f"http://127.0.0.1:{ll_port}"}
    with contextlib.ExitStack() as stack:
        for name, cmd in servers.items():
            stack.enter_context(_server(cmd, urls[name], name))
        for words in (62, 498):
            inputs = embedding_inputs(n, words, seed=words)
            best: dict[str, dict] = {}
            for r in range(rounds):
                for name in servers:
                    s = asyncio.run(_http_run(urls[name], inputs))
                    print(f"  nomic ~{words + 2} tokens, round {r}: {name:<13} "
                          f"{s['inputs_per_s']:8.1f} inputs/s {s['tokens_per_s']:9.0f} "
                          f"tokens/s p50 {s['p50_latency_ms']:.0f} ms", flush=True)
                    if name not in best or s["inputs_per_s"] > best[name]["inputs_per_s"]:
                        best[name] = s
            what = f"nomic-embed, {best['tokenmill']['total_tokens'] // n} tokens/input"
            _verdict(what, best, "llama-server", 1.5)
            _verdict(what + ", tokenmill --quantization q8_0",
                     {**best, "tokenmill": best["tokenmill-q8_0"]}, "llama-server", 1.5)


def minilm_part(rounds: int, n: int) -> None:
    from sentence_transformers import SentenceTransformer

    folder = str(fetch("all-minilm-l6-v2"))
    ours = EmbeddingEngine(EmbeddingEngineConfig(folder))
    q8 = EmbeddingEngine(EmbeddingEngineConfig(folder, quantization="q8_0"))
    ref = SentenceTransformer(folder, device="cpu", local_files_only=True)
    for words in (62, 248):
        inputs = embedding_inputs(n, words, seed=words)
        runs = {
            "tokenmill": lambda x=inputs: ours.embed(
                ours.fit([ours.tokenize(t) for t in x], None)),
            "tokenmill-q8_0": lambda x=inputs: q8.embed(
                q8.fit([q8.tokenize(t) for t in x], None)),
            "sentence-transformers": lambda x=inputs: ref.encode(
                x, batch_size=32, convert_to_tensor=True),
        }
        best: dict[str, dict] = {}
        for r in range(rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                with torch.inference_mode():
                    fn()
                rate = n / (time.perf_counter() - t)
                print(f"  minilm ~{words + 2} tokens, round {r}: {name:<22} {rate:8.1f} "
                      "inputs/s", flush=True)
                if rate > best.get(name, {}).get("inputs_per_s", 0):
                    best[name] = {"inputs_per_s": rate}
        _verdict(f"all-MiniLM, ~{words + 2} tokens/input", best, "sentence-transformers", 2.0)
        _verdict(f"all-MiniLM --quantization q8_0, ~{words + 2} tokens/input",
                 {**best, "tokenmill": best["tokenmill-q8_0"]}, "sentence-transformers", 2.0)


def _verdict(what: str, best: dict[str, dict], other: str, target: float) -> None:
    ours = best["tokenmill"]["inputs_per_s"]
    if other not in best:
        print(f"{what}: tokenmill {ours:.1f} inputs/s")
        return
    ratio = ours / best[other]["inputs_per_s"]
    print(f"{what}: tokenmill {ours:.1f} inputs/s, {other} "
          f"{best[other]['inputs_per_s']:.1f} -> {ratio:.2f}x (target >= {target}x: "
          f"{'met' if ratio >= target else 'NOT met'})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-inputs", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="8 inputs, 1 round")
    p.add_argument("--only", choices=["nomic", "minilm"], default=None)
    args = p.parse_args()
    rounds, n = (1, 8) if args.quick else (args.rounds, args.num_inputs)
    torch.set_num_threads(args.threads)
    if args.only != "minilm":
        nomic_part(args, rounds, n)
    if args.only != "nomic":
        minilm_part(rounds, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
