"""Soak: mixed, partly hostile traffic against the server for a while; what breaks, what leaks.

    python benchmarks/soak.py [--minutes 5] [--concurrency 8] [--max-tokens 16] [--seed 0]
        [--base-url http://127.0.0.1:8000 [--server-pid PID]] [--result-json PATH]
        [--max-model-len 1024] [--kv-cache-memory 512MiB] [--serve-arg=--flag ...]
    python benchmarks/soak.py --neighbour KIND [--minutes 2] [--concurrency 4] ...

Without ``--base-url`` a server is started here (``tokenmill serve`` on the embedded model,
a free loopback port, access log off) and stopped at the end (SIGTERM; its exit status is
reported). Only loopback addresses are accepted. Every request has a timeout and every
loop a deadline.

Mixed mode: ``--concurrency`` workers, each sending requests one after another until
``--minutes`` have passed, the kind drawn by weight (``KINDS``):

* normal (about 60%): chat and completions, plain and streamed, n=2, structured outputs
  (json_schema, regex, choice), tools with each tool_choice. Expected: 200.
* hostile (about 30%): malformed JSON, wrong types, huge values, lone surrogates, NaN and
  Infinity, deep nesting, oversized stop lists, unknown fields, and the fixed hostile
  bodies of tests/server/test_fuzz.py. Expected: 4xx with OpenAI's error shape (a 2xx is
  counted apart: the server took it).
* disconnects (about 10%): streams closed after a few chunks, non-streamed requests
  given up on after a fraction of a second.

Every response is checked as in the fuzz test (``problem_of``: never 5xx, OpenAI's error
shape, strict JSON, streams end with [DONE]). Reported: requests by kind and status class,
the distinct 5xx bodies (and other problems), p50/p99 latency of the normal requests,
the server's RSS (VmRSS of its process, sampled every second: after warm-up, peak, end),
and, once the server is idle after the run, ``num_requests_running``,
``num_requests_waiting`` and ``kv_cache_usage_perc`` from /metrics (all 0: no leaked
blocks) and /health.

RSS is not a leak detector on its own: the KV cache is allocated up front but its pages
count only once first written, so RSS climbs until every block has been used once. The
warm-up therefore also sends distinct long prompts until every block has been used
(``fill_kv_pool``; ``--no-fill-kv`` skips it), and "start" RSS is taken after it: growth
beyond that is a leak.

Neighbour mode (``--neighbour KIND``): one neighbour sends small chat requests (4 tokens,
greedy) one after another for half of ``--minutes`` alone, then for the other half while
``--concurrency`` workers send only KIND (any kind of ``KINDS``, or one of the abusive
``long_generation``, ``many_prompts``, ``huge_prompt``); its p50/p99 latency is reported
for both halves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server.fixture import Server, load, sample, scrape, start_server  # noqa: E402
from tests.server.test_fuzz import hostile_bodies, problem_of  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A fresh connection per request: a pooled keep-alive connection that the server closes
# just as it is reused (uvicorn closes idle ones after 5 s) would read as a dropped request.
NO_KEEP_ALIVE = httpx.Limits(max_connections=None, max_keepalive_connections=0)
WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count stars "
         "above quiet rivers and old mountains hold their breath").split()
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                       "required": ["tz"]}}},
]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


# ----------------------------------------------------------------------------- requests

@dataclass
class Outcome:
    kind: str
    group: str            # normal | hostile | disconnect
    status: int | None    # None: no response (or we hung up on purpose)
    latency: float
    problem: str | None = None
    request: str = ""


@dataclass
class Cfg:
    base_url: str
    headers: dict[str, str]
    max_tokens: int
    max_model_len: int
    timeout: float


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chat_body(rng: random.Random, cfg: Cfg, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": words(rng, 3, 40)}],
            "max_tokens": cfg.max_tokens, "temperature": rng.choice([0, 0.7, 1.0]), **extra}


def completion_body(rng: random.Random, cfg: Cfg, **extra: Any) -> dict[str, Any]:
    return {"prompt": words(rng, 3, 40), "max_tokens": cfg.max_tokens,
            "temperature": rng.choice([0, 0.7, 1.0]), **extra}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


async def send(client: httpx.AsyncClient, cfg: Cfg, kind: str, group: str, path: str,
               content: bytes, *, content_type: str = "application/json",
               hang_up_after_chunks: int | None = None,
               timeout: float | None = None) -> Outcome:
    """POSTs ``content``; reads the whole answer unless told to hang up after some chunks
    (a client that disconnects). A timeout on a request meant to be given up on is no
    problem; on any other it is."""
    headers = {**cfg.headers, "Content-Type": content_type}
    t0 = time.perf_counter()
    short = content[:300].decode("utf-8", errors="backslashreplace")
    try:
        async with client.stream("POST", cfg.base_url + path, content=content,
                                 headers=headers, timeout=timeout or cfg.timeout) as r:
            if hang_up_after_chunks is not None and r.status_code == 200:
                n = 0
                async for _ in r.aiter_raw():
                    n += 1
                    if n >= hang_up_after_chunks:
                        break
                return Outcome(kind, group, None, time.perf_counter() - t0, None, short)
            raw = await r.aread()
    except httpx.TimeoutException as e:
        problem = None if group == "disconnect" else f"no response: {type(e).__name__}"
        return Outcome(kind, group, None, time.perf_counter() - t0, problem, short)
    except httpx.HTTPError as e:
        return Outcome(kind, group, None, time.perf_counter() - t0,
                       f"no response: {type(e).__name__}: {e}", short)
    latency = time.perf_counter() - t0
    text = raw.decode("utf-8", errors="replace")
    problem = problem_of(r.status_code, r.headers.get("content-type", ""), text)
    if problem is None and group == "normal" and r.status_code != 200:
        problem = f"normal request answered {r.status_code}: {text[:300]}"
    return Outcome(kind, group, r.status_code, latency, problem, short)


Kind = Callable[[httpx.AsyncClient, random.Random, Cfg], Awaitable[Outcome]]
KINDS: dict[str, tuple[str, float, Kind]] = {}


def kind(name: str, group: str, weight: float) -> Callable[[Kind], Kind]:
    def register(fn: Kind) -> Kind:
        KINDS[name] = (group, weight, fn)
        return fn
    return register


# ---- normal

@kind("chat", "normal", 10)
async def _chat(c, rng, cfg):
    return await send(c, cfg, "chat", "normal", "/v1/chat/completions",
                      dumps(chat_body(rng, cfg)))


@kind("chat_stream", "normal", 10)
async def _chat_stream(c, rng, cfg):
    body = chat_body(rng, cfg, stream=True, stream_options={"include_usage": True})
    return await send(c, cfg, "chat_stream", "normal", "/v1/chat/completions", dumps(body))


@kind("completion", "normal", 8)
async def _completion(c, rng, cfg):
    return await send(c, cfg, "completion", "normal", "/v1/completions",
                      dumps(completion_body(rng, cfg)))


@kind("completion_stream", "normal", 8)
async def _completion_stream(c, rng, cfg):
    return await send(c, cfg, "completion_stream", "normal", "/v1/completions",
                      dumps(completion_body(rng, cfg, stream=True)))


@kind("n2", "normal", 5)
async def _n2(c, rng, cfg):
    if rng.random() < 0.5:
        return await send(c, cfg, "n2", "normal", "/v1/completions",
                          dumps(completion_body(rng, cfg, n=2, temperature=0.8)))
    return await send(c, cfg, "n2", "normal", "/v1/chat/completions",
                      dumps(chat_body(rng, cfg, n=2, temperature=0.8,
                                      stream=rng.random() < 0.5)))


@kind("json_schema", "normal", 5)
async def _json_schema(c, rng, cfg):
    body = chat_body(rng, cfg, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    body["max_tokens"] = cfg.max_tokens * 2
    return await send(c, cfg, "json_schema", "normal", "/v1/chat/completions", dumps(body))


@kind("regex", "normal", 4)
async def _regex(c, rng, cfg):
    body = completion_body(rng, cfg, structured_outputs={
        "regex": "[a-z ]{1,35}\\."})  # a repeated group with a space is refused (cost)
    return await send(c, cfg, "regex", "normal", "/v1/completions", dumps(body))


@kind("choice", "normal", 4)
async def _choice(c, rng, cfg):
    body = chat_body(rng, cfg, structured_outputs={"choice": ["yes", "no", "maybe"]},
                     stream=rng.random() < 0.5)
    return await send(c, cfg, "choice", "normal", "/v1/chat/completions", dumps(body))


@kind("tools", "normal", 6)
async def _tools(c, rng, cfg):
    choice = rng.choice(["auto", "required", "none",
                         {"type": "function", "function": {"name": "get_weather"}}])
    body = chat_body(rng, cfg, tools=TOOLS, tool_choice=choice, stream=rng.random() < 0.3)
    body["messages"][0]["content"] = "What is the weather in Paris? " + words(rng, 0, 10)
    body["max_tokens"] = cfg.max_tokens * 2
    return await send(c, cfg, "tools", "normal", "/v1/chat/completions", dumps(body))


# ---- hostile

def _valid(rng: random.Random, cfg: Cfg) -> tuple[str, dict[str, Any]]:
    if rng.random() < 0.5:
        return "/v1/chat/completions", chat_body(rng, cfg)
    return "/v1/completions", completion_body(rng, cfg)


NUMERIC = ("max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
           "priority", "logprobs", "prompt_logprobs")


@kind("malformed_json", "hostile", 4)
async def _malformed(c, rng, cfg):
    path, body = _valid(rng, cfg)
    raw = dumps(body)
    cut = rng.randrange(1, len(raw))
    raw = rng.choice([raw[:cut], raw[:cut] + b"\x00" + raw[cut:], raw.replace(b":", b"", 1),
                      raw + b"}", b"{'single': 'quotes'}", raw.replace(b'"', b"", 2)])
    return await send(c, cfg, "malformed_json", "hostile", path, raw)


@kind("wrong_types", "hostile", 4)
async def _wrong_types(c, rng, cfg):
    path, body = _valid(rng, cfg)
    key = rng.choice([*body, *NUMERIC, "stop", "stream", "logit_bias", "tools",
                      "response_format", "structured_outputs", "stop_token_ids"])
    body[key] = rng.choice([None, "text", 1.5, [], {}, True, -1, [1, "a"], {"a": [None]}])
    return await send(c, cfg, "wrong_types", "hostile", path, dumps(body))


@kind("huge_values", "hostile", 4)
async def _huge(c, rng, cfg):
    path, body = _valid(rng, cfg)
    body[rng.choice(NUMERIC)] = rng.choice([10 ** rng.randint(10, 40), -10 ** rng.randint(10, 40),
                                            1e308, -1e308, 2**63, 2**64, 2**31])
    return await send(c, cfg, "huge_values", "hostile", path, dumps(body))


@kind("lone_surrogates", "hostile", 3)
async def _surrogates(c, rng, cfg):
    path, body = _valid(rng, cfg)
    lone = chr(rng.randint(0xD800, 0xDFFF))
    where = rng.choice(["text", "stop", "key"])
    if where == "text":
        if "prompt" in body:
            body["prompt"] += lone
        else:
            body["messages"][0]["content"] += lone
    elif where == "stop":
        body["stop"] = [lone, "x" + lone]
    else:
        body[lone] = 1
    return await send(c, cfg, "lone_surrogates", "hostile", path, dumps(body))


@kind("nan", "hostile", 3)
async def _nan(c, rng, cfg):
    path, body = _valid(rng, cfg)
    value = rng.choice([math.nan, math.inf, -math.inf])
    key = rng.choice([*NUMERIC, "logit_bias"])
    body[key] = {"5": value} if key == "logit_bias" else value
    return await send(c, cfg, "nan", "hostile", path, dumps(body))


@kind("deep_nesting", "hostile", 2)
async def _deep(c, rng, cfg):
    path, body = _valid(rng, cfg)
    depth = rng.choice([100, 1000, 10_000, 100_000])
    key = rng.choice(["prompt", "metadata", "stop", "logit_bias", "tools", "unknown"])
    raw = dumps(body)[:-1] + f', "{key}": '.encode() + b"[" * depth + b"]" * depth + b"}"
    return await send(c, cfg, "deep_nesting", "hostile", path, raw)


@kind("oversized_stop", "hostile", 2)
async def _stops(c, rng, cfg):
    path, body = _valid(rng, cfg)
    n = rng.choice([100, 1000, 10_000, 50_000])
    body["stop"] = [words(rng, 1, 2) + str(i) for i in range(n)]
    return await send(c, cfg, "oversized_stop", "hostile", path, dumps(body))


@kind("unknown_fields", "hostile", 3)
async def _unknown(c, rng, cfg):
    path, body = _valid(rng, cfg)
    for _ in range(rng.randint(1, 5)):
        body[f"x_{rng.randrange(10**6)}"] = rng.choice([1, "a", None, [], {}])
    return await send(c, cfg, "unknown_fields", "hostile", path, dumps(body))


HOSTILE_CORPUS = hostile_bodies()


@kind("corpus", "hostile", 5)
async def _corpus(c, rng, cfg):
    path, ctype, raw, _what = rng.choice(HOSTILE_CORPUS)
    return await send(c, cfg, "corpus", "hostile", path, raw, content_type=ctype)


# ---- disconnects

@kind("disconnect_stream", "disconnect", 6)
async def _hang_up_stream(c, rng, cfg):
    path, body = _valid(rng, cfg)
    body.update(stream=True, max_tokens=min(64, cfg.max_model_len // 4), n=rng.choice([1, 2]))
    return await send(c, cfg, "disconnect_stream", "disconnect", path, dumps(body),
                      hang_up_after_chunks=rng.randint(1, 3))


@kind("disconnect_wait", "disconnect", 4)
async def _give_up(c, rng, cfg):
    path, body = _valid(rng, cfg)
    body.update(max_tokens=min(64, cfg.max_model_len // 4))
    return await send(c, cfg, "disconnect_wait", "disconnect", path, dumps(body),
                      timeout=rng.uniform(0.1, 1.0))


# ---- abusive (neighbour mode only: weight 0)

@kind("long_generation", "normal", 0)
async def _long(c, rng, cfg):
    body = completion_body(rng, cfg, max_tokens=cfg.max_model_len // 2, n=4,
                           ignore_eos=True, temperature=1.0)
    return await send(c, cfg, "long_generation", "normal", "/v1/completions", dumps(body))


@kind("many_prompts", "normal", 0)
async def _many(c, rng, cfg):
    body = {"prompt": [words(rng, 2, 6) for _ in range(200)], "max_tokens": 2}
    return await send(c, cfg, "many_prompts", "normal", "/v1/completions", dumps(body))


@kind("huge_prompt", "normal", 0)
async def _huge_prompt(c, rng, cfg):
    body = {"prompt": words(rng, cfg.max_model_len // 2, cfg.max_model_len // 2),
            "max_tokens": 2}
    return await send(c, cfg, "huge_prompt", "normal", "/v1/completions", dumps(body))


async def neighbour_request(c, rng, cfg):
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
            "temperature": 0}
    return await send(c, cfg, "neighbour", "normal", "/v1/chat/completions", dumps(body))


# ----------------------------------------------------------------------------- the run

def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pid_listening_on(port: int) -> int | None:
    """The process (of this user) with a TCP socket listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        inodes.add(parts[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


async def sample_rss(pid: int | None, stats: Stats, stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        kib = rss_kib(pid)
        if kib is not None:
            stats.rss.append((time.monotonic(), kib))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def worker(client: httpx.AsyncClient, cfg: Cfg, rng: random.Random, names: list[str],
                 weights: list[float], deadline: float, out: list[Outcome]) -> None:
    while time.monotonic() < deadline:
        name = rng.choices(names, weights)[0]
        try:
            out.append(await KINDS[name][2](client, rng, cfg))
        except Exception as e:  # a bug in this script must not stop the others
            out.append(Outcome(name, KINDS[name][0], None, 0.0,
                               f"client error: {type(e).__name__}: {e}"))


async def run_load(cfg: Cfg, names: list[str], concurrency: int, seconds: float,
                   seed: int) -> list[Outcome]:
    weights = [KINDS[n][1] or 1.0 for n in names]
    out: list[Outcome] = []
    async with httpx.AsyncClient(limits=NO_KEEP_ALIVE) as client:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(worker(client, cfg, random.Random(seed * 1000 + i), names,
                                      weights, deadline, out) for i in range(concurrency)))
    return out


async def run_neighbour(cfg: Cfg, seconds: float) -> list[Outcome]:
    out = []
    rng = random.Random(0)
    async with httpx.AsyncClient(limits=NO_KEEP_ALIVE) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out.append(await neighbour_request(client, rng, cfg))
    return out


async def warm_up(cfg: Cfg) -> list[Outcome]:
    rng = random.Random(12345)
    async with httpx.AsyncClient(limits=NO_KEEP_ALIVE) as client:
        return [await KINDS[n][2](client, rng, cfg)
                for n in ("chat", "completion_stream", "json_schema", "regex", "choice",
                          "tools")]


def fill_kv_pool(server: Server, cfg: Cfg, deadline_s: float = 600.0) -> float | None:
    """Sends distinct long prompts (1 output token each) until every KV block has been
    used once (``tokenmill:kv_cache_touched_perc`` >= 0.99) or the deadline passes;
    returns the last fraction seen. The pool's pages are resident from then on (the
    prefix cache keeps the blocks), so RSS measured after this is the server's working
    size and growth beyond it is a leak."""
    rng = random.Random(54321)
    t0 = time.monotonic()
    touched = None
    with httpx.Client(headers=server.headers, timeout=cfg.timeout) as client:
        while time.monotonic() - t0 < deadline_s:
            touched = sample(scrape(server), "tokenmill:kv_cache_touched_perc")
            if touched is None or touched >= 0.99:
                break
            print(f"warm-up: {touched:.0%} of the KV blocks used once", flush=True)
            # ~1.5 tokens a word: stay under max_model_len
            n_words = max(16, int(cfg.max_model_len / 1.5) - 16)
            client.post(cfg.base_url + "/v1/completions", json={
                "prompt": words(rng, n_words, n_words), "max_tokens": 1})
    return touched


def wait_idle(server: Server, timeout: float) -> tuple[tuple, float]:
    t0 = time.monotonic()
    state: tuple = (None, None, None)
    while time.monotonic() - t0 < timeout:
        try:
            state = load(server)
        except (httpx.HTTPError, AssertionError) as e:
            state = (f"/metrics failed: {e}",)
        if state == (0, 0, 0):
            break
        time.sleep(0.5)
    return state, time.monotonic() - t0


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    by_class: Counter = Counter()
    per_kind: dict[str, Counter] = defaultdict(Counter)
    five: dict[str, dict[str, Any]] = {}
    problems: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        cls = "hung up" if (o.status is None and o.group == "disconnect" and not o.problem) \
            else "no response" if o.status is None else f"{o.status // 100}xx"
        by_class[cls] += 1
        per_kind[o.kind][cls] += 1
        if o.problem:
            bucket = five if (o.status or 0) >= 500 else problems
            key = f"{o.kind}: {o.problem[:200]}"
            entry = bucket.setdefault(key, {"kind": o.kind, "status": o.status,
                                            "problem": o.problem[:600], "count": 0,
                                            "request": o.request})
            entry["count"] += 1
    lat = [o.latency for o in outcomes if o.group == "normal" and o.status == 200]
    per_kind_lat = {k: round(statistics.median(v), 3) for k, v in sorted(
        _group([(o.kind, o.latency) for o in outcomes
                if o.group == "normal" and o.status == 200]).items())}
    hostile_taken = Counter(o.kind for o in outcomes
                            if o.group == "hostile" and o.status and o.status < 300)
    return {
        "requests": len(outcomes),
        "by_group": dict(Counter(o.group for o in outcomes)),
        "by_status_class": dict(by_class),
        "by_status": dict(Counter(str(o.status) for o in outcomes)),
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "normal_latency_s": {"n": len(lat), "p50": _r(pct(lat, 0.5)),
                             "p99": _r(pct(lat, 0.99)), "per_kind_p50": per_kind_lat},
        "hostile_accepted_2xx": dict(hostile_taken),
        "distinct_5xx": list(five.values()),
        "other_problems": list(problems.values()),
    }


def _group(pairs: list[tuple[str, float]]) -> dict[str, list[float]]:
    g: dict[str, list[float]] = defaultdict(list)
    for k, v in pairs:
        g[k].append(v)
    return g


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16, help="of the normal requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neighbour", default=None, metavar="KIND",
                   help=f"neighbour mode against one kind: {', '.join(KINDS)}")
    p.add_argument("--base-url", default=None, help="a running (loopback) server")
    p.add_argument("--server-pid", type=int, default=None,
                   help="its process, for RSS (default: whoever listens on its port)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--no-fill-kv", action="store_true",
                   help="skip the warm-up that uses every KV block once (see fill_kv_pool)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra flag for tokenmill serve (repeat; use --serve-arg=--flag)")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="how long to wait for the server to be idle after the run")
    p.add_argument("--result-json", default=None)
    args = p.parse_args()
    if args.neighbour is not None and args.neighbour not in KINDS:
        p.error(f"--neighbour: unknown kind {args.neighbour!r}; one of {', '.join(KINDS)}")

    started_here = args.base_url is None
    if started_here:
        server = start_server("--kv-cache-memory", args.kv_cache_memory, "--max-model-len",
                              str(args.max_model_len), "--disable-access-log",
                              *args.serve_arg)
        pid: int | None = server.proc.pid
        print(f"server {server.base_url} pid {pid}, log {server.log_path}", flush=True)
    else:
        parts = urlsplit(args.base_url)
        if parts.hostname not in LOOPBACK:
            p.error(f"--base-url must be a loopback address, not {parts.hostname!r}")
        server = Server(None, args.base_url.rstrip("/"), os.devnull,  # type: ignore[arg-type]
                        api_key=os.environ.get("TOKENMILL_API_KEY"))
        pid = args.server_pid or pid_listening_on(parts.port or 80)
        if pid is None:
            print("server process not found: no RSS", flush=True)
    cfg = Cfg(server.base_url, server.headers, args.max_tokens, args.max_model_len,
              args.timeout)
    stats = Stats()
    result: dict[str, Any] = {"mode": "neighbour" if args.neighbour else "mixed",
                              "minutes": args.minutes, "concurrency": args.concurrency,
                              "max_tokens": args.max_tokens, "seed": args.seed,
                              "server_pid": pid, "started_here": started_here}
    try:
        warm = asyncio.run(warm_up(cfg))
        result["warm_up_problems"] = [asdict(o) for o in warm if o.problem]
        if not args.no_fill_kv:
            result["kv_touched_after_warm_up"] = fill_kv_pool(server, cfg)
        seconds = 60 * args.minutes

        async def measured() -> None:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(pid, stats, stop))
            try:
                if args.neighbour:
                    alone = await run_neighbour(cfg, seconds / 2)
                    busy, abuse = await asyncio.gather(
                        run_neighbour(cfg, seconds / 2),
                        run_load(cfg, [args.neighbour], args.concurrency, seconds / 2,
                                 args.seed))
                    result["neighbour"] = {
                        "kind": args.neighbour,
                        "alone": _lat(alone), "with_abuse": _lat(busy),
                        "abuser": summarize(abuse)}
                    stats.outcomes.extend(alone + busy + abuse)
                else:
                    names = [n for n, (_, w, _) in KINDS.items() if w > 0]
                    stats.outcomes.extend(await run_load(cfg, names, args.concurrency,
                                                         seconds, args.seed))
            finally:
                stop.set()
                await sampler

        t0 = time.monotonic()
        asyncio.run(measured())
        result["seconds"] = round(time.monotonic() - t0, 1)
        result.update(summarize(stats.outcomes))
        state, waited = wait_idle(server, args.idle_timeout)
        end_rss = rss_kib(pid) if pid else None
        rss = [k for _, k in stats.rss]
        result["rss_kib"] = {"start": rss[0] if rss else None, "peak": max(rss, default=None),
                             "end": end_rss}
        result["after"] = {"idle_after_s": round(waited, 1), "running_waiting_kv": state,
                           "leak_free": state == (0, 0, 0)}
        try:
            result["after"]["health"] = httpx.get(server.base_url + "/health",
                                                  timeout=10).status_code
        except httpx.HTTPError as e:
            result["after"]["health"] = f"{type(e).__name__}: {e}"
    finally:
        if started_here:
            code = server.stop()
            result["server_exit"] = "killed (no exit within 30 s of SIGTERM)" if code is None \
                else code
            result["server_log"] = server.log_path
    print(report_text(result))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result, indent=2, default=str))
    bad = (result.get("distinct_5xx") or result.get("other_problems")
           or not result.get("after", {}).get("leak_free")
           or result.get("after", {}).get("health") != 200)
    return 1 if bad else 0


def _lat(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o.latency for o in outcomes if o.status == 200]
    return {"n": len(outcomes), "ok": len(ok), "p50": _r(pct(ok, 0.5)),
            "p99": _r(pct(ok, 0.99))}


def report_text(r: dict[str, Any]) -> str:
    lines = [f"soak ({r['mode']}): {r.get('seconds', '?')} s, concurrency {r['concurrency']}, "
             f"max_tokens {r['max_tokens']}, seed {r['seed']}, server pid {r['server_pid']}"]
    if "requests" in r:
        classes = r["by_status_class"]
        lines.append(f"requests: {r['requests']} {r['by_group']}")
        lines.append("status: " + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())))
        lines.append("per kind: " + "; ".join(
            f"{k} " + "/".join(f"{c}:{n}" for c, n in sorted(v.items()))
            for k, v in r["per_kind"].items()))
        lat = r["normal_latency_s"]
        lines.append(f"normal latency (200s, n={lat['n']}): p50 {lat['p50']} s, "
                     f"p99 {lat['p99']} s; per kind p50 {lat['per_kind_p50']}")
        if r["hostile_accepted_2xx"]:
            lines.append(f"hostile requests the server took (2xx): {r['hostile_accepted_2xx']}")
        lines.append(f"distinct 5xx: {len(r['distinct_5xx'])}")
        for e in r["distinct_5xx"]:
            lines.append(f"  [{e['count']}x] {e['kind']} {e['status']}: {e['problem'][:300]}\n"
                         f"        request: {e['request'][:200]}")
        lines.append(f"other problems: {len(r['other_problems'])}")
        for e in r["other_problems"]:
            lines.append(f"  [{e['count']}x] {e['kind']} {e['status']}: {e['problem'][:300]}\n"
                         f"        request: {e['request'][:200]}")
    if "neighbour" in r:
        nb = r["neighbour"]
        a, b = nb["alone"], nb["with_abuse"]
        ratio = (f"{b['p50'] / a['p50']:.1f}x" if a["p50"] and b["p50"] else "?")
        lines.append(f"neighbour vs {nb['kind']}: alone p50 {a['p50']} s p99 {a['p99']} s "
                     f"({a['ok']}/{a['n']} ok); with abuse p50 {b['p50']} s p99 {b['p99']} s "
                     f"({b['ok']}/{b['n']} ok); p50 {ratio}")
    if "rss_kib" in r:
        rs = r["rss_kib"]
        lines.append(f"KV blocks used once after warm-up: {r.get('kv_touched_after_warm_up')}")
        lines.append(f"server RSS: start {mib(rs['start'])}, peak {mib(rs['peak'])}, "
                     f"end {mib(rs['end'])}")
    if "after" in r:
        a = r["after"]
        lines.append(f"after the run (waited {a['idle_after_s']} s): (running, waiting, "
                     f"kv_cache_usage) = {a['running_waiting_kv']} -> "
                     f"{'no leaked blocks' if a['leak_free'] else 'NOT IDLE: leak or stuck'}"
                     f"; /health {a.get('health')}")
    if "server_exit" in r:
        lines.append(f"server exit on SIGTERM: {r['server_exit']}; log {r['server_log']}")
    if r.get("warm_up_problems"):
        lines.append(f"warm-up problems: {r['warm_up_problems']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
