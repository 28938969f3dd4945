"""Each abusive request of the hardening audit, next to an honest neighbour.

Starts ``tokenmill serve`` (embedded model) on a free loopback port, measures a neighbour
(an 8-token greedy completion, one after another) alone, then while each abusive case is
sent again and again (one at a time, ``--pause`` apart), and reports per case: the abusive
request's status codes, the neighbour's p50 and max latency against its latency alone, and
the server's peak RSS. Not a test: run it on a quiet machine.

    python benchmarks/abuse_neighbour.py --seconds 12 --result-json out.json
    python benchmarks/abuse_neighbour.py --seconds 10 --case regex --case "stop strings"

"unread 8 x 400-token stream" is real work: 8 sequences of 400 tokens, batched with the
neighbour's, whether or not its client reads. "read 8 x 400-token stream" sends the same
request and reads it: the difference between the two is what not reading costs the others.
The server only notices a client that stopped reading once the socket buffers between them
are full (~3 MB on Linux loopback, as the kernel grows the send buffer) and then
``--stream-stall-timeout`` seconds have passed; 8 x 400 tokens of events (~1 MB) never get
there, so that request simply runs to its end (or until the client hangs up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

NEIGHBOUR = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
             "ignore_eos": True}
CHAT = [{"role": "user", "content": "Say hi."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def post(c: httpx.AsyncClient, path: str, body: Any = None, content: bytes | None = None,
               **kw: Any) -> int:
    if content is not None:
        r = await c.post(path, content=content, headers={"Content-Type": "application/json"},
                         **kw)
    else:
        r = await c.post(path, json=body, **kw)
    return r.status_code


async def half_open_connections(base: str, n: int = 40, hold: float = 10.0) -> int:
    """n connections that send half a request head, and n that send less body than their
    Content-Length; held open ``hold`` seconds (or until the server closes them)."""
    host, port = base.removeprefix("http://").split(":")
    writers = []
    for i in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        if i % 2:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        else:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        await writer.drain()
        writers.append((reader, writer))
    await asyncio.sleep(hold)
    closed = 0
    for reader, writer in writers:
        closed += reader.at_eof()
        writer.close()
    return 200 if closed else 0  # 200: the server closed some of them itself


async def unread_stream(base: str) -> int:
    """A stream of 8 x 400 tokens whose client never reads (then hangs up)."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "n": 8,
                       "stream": True, "ignore_eos": True}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    await writer.drain()
    await asyncio.sleep(8.0)  # never read
    writer.close()
    return 200


async def read_stream(c: httpx.AsyncClient) -> int:
    """The same 8 x 400-token stream as ``unread_stream``, read as it comes."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "n": 8, "stream": True,
            "ignore_eos": True}
    async with c.stream("POST", "/v1/completions", json=body, timeout=300) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code


def cases(base: str) -> dict[str, Callable[[httpx.AsyncClient], Awaitable[int]]]:
    big = "x" * (10 * 2**20)
    return {
        "top_k 10^20": lambda c: post(c, "/v1/completions", {
            "prompt": "hi", "max_tokens": 2, "top_k": 10**20, "temperature": 1.0}),
        "lone surrogate": lambda c: post(c, "/v1/chat/completions", content=(
            b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}')),
        "chat_template_kwargs self": lambda c: post(c, "/v1/chat/completions", {
            "messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {"self": 1}}),
        "nested 600 deep": lambda c: post(c, "/v1/chat/completions", content=(
            b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            + b'{"a": ' * 600 + b"1" + b"}" * 600 + b"}")),
        "tool_calls function 5": lambda c: post(c, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "tool_calls": [{"function": 5}]}],
            "max_tokens": 2}),
        "regex ((ab|[^a]){0,30}){0,30}": lambda c: post(c, "/v1/completions", {
            "prompt": "hi", "max_tokens": 8, "guided_regex": "((ab|[^a]){0,30}){0,30}"},
            timeout=120),
        "regex (.|..){0,300}": lambda c: post(c, "/v1/completions", {
            "prompt": "hi", "max_tokens": 8, "guided_regex": "(.|..){0,300}"}, timeout=120),
        "100,000 stop strings n=4": lambda c: post(c, "/v1/completions", {
            "prompt": "hi", "max_tokens": 8, "n": 4,
            "stop": [f"s{i}" for i in range(100_000)]}),
        "10 MiB prompt": lambda c: post(c, "/v1/completions", {"prompt": big,
                                                               "max_tokens": 2}),
        "n=128 x 32 prompts": lambda c: post(c, "/v1/completions", {
            "prompt": ["hi"] * 32, "max_tokens": 2, "n": 128}),
        "logit_bias 49,152 entries": lambda c: post(c, "/v1/completions", {
            "prompt": ["hi", "ho"], "max_tokens": 2, "n": 128,
            "logit_bias": {str(i): 0.1 for i in range(49152)}}),
        "enum of 20,000 values": lambda c: post(c, "/v1/completions", {
            "prompt": "hi", "max_tokens": 4, "guided_json": {
                "enum": [f"value-{i}" for i in range(20000)]}}),
        "40 half-open connections": lambda c: half_open_connections(base),
        "unread 8 x 400-token stream": lambda c: unread_stream(base),
        "read 8 x 400-token stream": read_stream,
    }


async def neighbour(c: httpx.AsyncClient, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        r = await c.post("/v1/completions", json=NEIGHBOUR, timeout=300)
        r.raise_for_status()
        out.append(time.perf_counter() - t)


async def measure(base: str, pid: int, seconds: float, abuse=None,
                  pause: float = 0.2) -> dict[str, Any]:
    stop = asyncio.Event()
    lat: list[float] = []
    codes: Counter = Counter()
    peak = [rss_mib(pid)]

    async def abuser() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            while not stop.is_set():
                try:
                    codes[await abuse(c)] += 1
                except httpx.HTTPError as e:
                    codes[type(e).__name__] += 1
                await asyncio.sleep(pause)  # one abusive request after another, not a flood

    async def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        tasks = [asyncio.create_task(neighbour(c, stop, lat)), asyncio.create_task(sample())]
        if abuse is not None:
            tasks.append(asyncio.create_task(abuser()))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return {"p50_s": statistics.median(lat), "max_s": max(lat), "n": len(lat),
            "codes": dict(codes), "peak_rss_mib": round(peak[0], 1)}


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="abuse-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", "--port", str(port),
                             "--disable-access-log", *a.serve_arg], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=base) as c:
            for _ in range(600):
                try:
                    if (await c.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        await measure(base, proc.pid, 3)  # warm-up
        results: dict[str, Any] = {"alone": await measure(base, proc.pid, a.seconds)}
        print(f"alone: {results['alone']}", flush=True)
        for name, fn in cases(base).items():
            if a.case and not any(want in name for want in a.case):
                continue
            results[name] = r = await measure(base, proc.pid, a.seconds, fn, a.pause)
            ratio = r["p50_s"] / results["alone"]["p50_s"]
            print(f"{name}: neighbour p50 {r['p50_s'] * 1e3:.0f} ms ({ratio:.2f}x alone), "
                  f"max {r['max_s'] * 1e3:.0f} ms; abusive answers {r['codes']}; "
                  f"peak RSS {r['peak_rss_mib']} MiB", flush=True)
        results["alone_after"] = await measure(base, proc.pid, a.seconds)
        print(f"alone after: {results['alone_after']}", flush=True)
        async with httpx.AsyncClient(base_url=base) as c:
            results["metrics_tail"] = [line for line in (await c.get("/metrics")).text
                                       .splitlines() if line.startswith(
                                           ("tokenmill:num_requests", "tokenmill:kv_cache"))]
        print("\n".join(results["metrics_tail"]))
        return results
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        print(f"server log: {log.name}; exit status {proc.returncode}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=12.0, help="per case")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra flag for tokenmill serve (use --serve-arg=--flag)")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds between two abusive requests (a flood is a rate-limit "
                        "matter, not what one request costs its neighbours)")
    p.add_argument("--case", action="append", default=[],
                   help="run only the cases whose name contains this (repeatable)")
    p.add_argument("--result-json", default=None)
    a = p.parse_args()
    results = asyncio.run(main_async(a))
    if a.result_json:
        os.makedirs(os.path.dirname(os.path.abspath(a.result_json)), exist_ok=True)
        with open(a.result_json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
