"""``tokenmill serve --data-parallel-size 2`` end to end through the HTTP API.

One server for the module (two replica processes with the embedded model, one request
running per replica so that later requests queue): both replicas serve, the cache-aware
router sends a repeated prompt back to the replica that cached it, a closed stream is
aborted on its replica, and a replica killed with SIGKILL under load fails only the
stream it was producing, re-routes its queued requests, and is restarted.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.server.fixture import error_of, post, running_server, sse_payloads

ARGS = ("--data-parallel-size", "2", "--max-num-seqs", "1", "--kv-cache-memory", "32MiB",
        "--max-model-len", "512", "--disable-access-log")
LONG = " ".join(f"word{i}" for i in range(60))  # ~120 tokens: several KV blocks


@pytest.fixture(scope="module")
def server():
    with running_server(*ARGS) as s:
        yield s


def replica_samples(server, name: str) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    pat = re.compile(rf'^tokenmill:{name}\{{model_name="[^"]*",replica="(\d+)"\}} (\S+)$', re.M)
    return {m.group(1): float(m.group(2)) for m in pat.finditer(text)}


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def complete(server, prompt: str, max_tokens: int = 4, **extra) -> httpx.Response:
    return post(server, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                            **extra})


def test_both_replicas_serve_and_a_repeated_prompt_meets_its_cache(server):
    results = {}

    def run(i: int) -> None:
        results[i] = complete(server, f"{i} {LONG} {i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), results
    queries = wait_for(lambda: (q := replica_samples(server, "prefix_cache_queries_total"))
                       and all(v > 0 for v in q.values()) and q, what="both replicas used")
    assert set(queries) == {"0", "1"}
    # the same long prompt again: routed to the replica that has it, so it is cached
    first = complete(server, "repeat " + LONG)
    again = complete(server, "repeat " + LONG)
    assert first.status_code == again.status_code == 200
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 96, again.json()["usage"]


def test_streams_and_aborts_on_the_replica(server):
    body = {"prompt": LONG, "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        got = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got.append(line)
            if len(got) >= 3:
                break
    assert len(got) == 3
    # the client left: the replica's running request is aborted well before 300 tokens
    wait_for(lambda: sum(replica_samples(server, "num_requests_running").values()) == 0,
             timeout=10, what="the abort to reach the replica")
    r = complete(server, "x", max_tokens=0)
    assert error_of(r, 400)


def _pids(server) -> dict[int, int]:
    """The live pid of each replica, from the server's log."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"replica (\d+) (?:ready|restarted) \(pid (\d+)", server.log(10**7)):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


def test_sigkill_of_a_replica_under_load(server):
    # long enough to be running when the replica is killed, even on a fast machine
    stream_body = {"max_tokens": 480, "stream": True, "ignore_eos": True}
    streams: dict[int, str] = {}
    finals: dict[int, httpx.Response] = {}

    def stream(i: int) -> None:
        r = post(server, "/v1/completions", {**stream_body, "prompt": f"stream {i}"})
        streams[i] = r.text

    def queued(i: int) -> None:
        finals[i] = complete(server, f"queued {i} {LONG}", max_tokens=3)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(replica_samples(server, "num_requests_running").values()) == 2,
             what="a stream running on each replica")
    more = [threading.Thread(target=queued, args=(i,)) for i in range(2)]
    for t in more:
        t.start()
    wait_for(lambda: sum(replica_samples(server, "num_requests_waiting").values()) >= 2,
             what="requests queued behind the streams")
    os.kill(_pids(server)[0], signal.SIGKILL)
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
    for t in threads + more:
        t.join(60)
        assert not t.is_alive(), "a request hangs after its replica was killed"
    # the stream the dead replica was producing ends with an error frame; the other ends
    # normally; the queued requests were re-routed and completed
    outcomes = sorted("error" if any('"error"' in p for p in sse_payloads(text)) else "ok"
                      for text in streams.values())
    assert outcomes == ["error", "ok"], [sse_payloads(t)[-2:] for t in streams.values()]
    assert all(r.status_code == 200 for r in finals.values()), finals
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in finals.values())
    # the replica comes back and serves again
    wait_for(lambda: "replica 0 restarted" in server.log(10**7), timeout=60,
             what="the replica to restart")
    results = [complete(server, f"after {i} {LONG}") for i in range(2)]
    assert all(r.status_code == 200 for r in results)
    wait_for(lambda: replica_samples(server, "prefix_cache_queries_total").get("0", 0) > 0,
             what="the restarted replica to serve")


def test_one_engine_refuses_data_parallel_and_cores_are_split():
    from tokenmill.config import EngineConfig
    from tokenmill.engine_args import EngineArgs
    from tokenmill.replicas.transport import split_cores

    with pytest.raises(ValueError, match="tokenmill serve --data-parallel-size"):
        EngineConfig.from_args(EngineArgs(model="m.gguf", data_parallel_size=2))
    with pytest.raises(ValueError, match="tokenmill serve --tensor-parallel-size"):
        EngineConfig.from_args(EngineArgs(model="m.gguf", tensor_parallel_size=2))
    assert split_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert split_cores(3, [5, 6]) == [[5], [6], [5]]
