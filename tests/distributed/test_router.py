"""``tokenmill router`` against fake workers (httpx mock transports): pass-through,
streaming, cache-aware stickiness, dead-worker removal and re-admission, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tokenmill.cli import main
from tokenmill.distributed.routing import RouterConfig
from tokenmill.router.app import build_router_app
from tokenmill.router.workers import WorkerPool

A, B = "http://worker-a:8000", "http://worker-b:8000"


class FakeWorkers:
    """Two workers: /health, and /v1/completions answering which worker served it (SSE
    when asked to stream). ``refusing``: connection refused; ``unhealthy``: /health 503."""

    def __init__(self) -> None:
        self.served: dict[str, list[str]] = {A: [], B: []}
        self.refusing: set[str] = set()
        self.unhealthy: set[str] = set()
        self.seen_auth: list[str | None] = []
        self.stored: dict[str, list[str]] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if url in self.refusing:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(503 if url in self.unhealthy else 200)
        if request.url.path.startswith("/v1/responses/"):
            rid = request.url.path.rsplit("/", 1)[1]
            if rid in self.stored.get(url, ()):
                return httpx.Response(200, json={"id": rid, "worker": url})
            return httpx.Response(404, json={"error": {"message": "unknown"}})
        if request.url.path == "/v1/responses":
            body = json.loads(request.content)
            rid = f"resp_{len(self.stored.setdefault(url, []))}_{url[-6:-5]}"
            self.stored[url].append(rid)
            return httpx.Response(200, json={"id": rid, "worker": url,
                                             "previous": body.get("previous_response_id")})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": url}]})
        body = json.loads(request.content)
        self.served[url].append(body["prompt"])
        self.seen_auth.append(request.headers.get("authorization"))
        if body.get("stream"):
            frames = [f"data: {json.dumps({'worker': url, 'i': i})}\n\n" for i in range(3)]
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content="".join(frames + ["data: [DONE]\n\n"]).encode())
        return httpx.Response(200, json={"worker": url, "usage": {}})


def run(coro):
    return asyncio.run(coro)


async def _setup(workers: FakeWorkers, policy: str = "cache_aware"):
    upstream = httpx.AsyncClient(transport=httpx.MockTransport(workers.handle))
    pool = WorkerPool([A, B], RouterConfig(policy=policy, chunk=8), failures_to_remove=1)
    app = build_router_app(pool, client=upstream, health_checks=False)
    await pool.check_once(upstream)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r")
    return pool, upstream, client


def test_cache_aware_sticks_each_prompt_to_one_worker_and_spreads_new_ones():
    async def go():
        workers = FakeWorkers()
        _, _, client = await _setup(workers)
        prompts = [f"system prompt number {g} " * 4 for g in range(4)]
        for _ in range(3):
            for p in prompts:
                r = await client.post("/v1/completions", json={"prompt": p + "question?"},
                                      headers={"Authorization": "Bearer k"})
                assert r.status_code == 200
        for p in prompts:
            homes = {w for w, got in workers.served.items() if p + "question?" in got}
            assert len(homes) == 1, (p, workers.served)
        assert workers.served[A] and workers.served[B]
        assert set(workers.seen_auth) == {"Bearer k"}
        metrics = (await client.get("/metrics")).text
        assert f'tokenmill_router:requests_total{{worker="{A}"}}' in metrics
    run(go())


def test_streaming_is_passed_through():
    async def go():
        workers = FakeWorkers()
        _, _, client = await _setup(workers, "round_robin")
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.text.split("\n\n") if f]
        assert frames[-1] == "data: [DONE]" and len(frames) == 4
        assert [json.loads(f[6:])["i"] for f in frames[:3]] == [0, 1, 2]
    run(go())


def test_dead_worker_is_removed_then_readmitted():
    async def go():
        workers = FakeWorkers()
        pool, upstream, client = await _setup(workers, "round_robin")
        workers.refusing.add(A)
        for i in range(4):  # every request lands on B; the first to try A removes it
            r = await client.post("/v1/completions", json={"prompt": f"p{i}"})
            assert r.status_code == 200 and r.json()["worker"] == B
        assert pool.healthy() == [B] and not workers.served[A]
        assert 'tokenmill_router:worker_up{worker="http://worker-a:8000"} 0.0' in (
            await client.get("/metrics")).text
        workers.refusing.clear()
        workers.unhealthy.add(B)
        await pool.check_once(upstream)  # A answers /health again, B says 503
        assert pool.healthy() == [A]
        r = await client.post("/v1/completions", json={"prompt": "back"})
        assert r.json()["worker"] == A
        workers.unhealthy.clear()
        await pool.check_once(upstream)
        got = {(await client.post("/v1/completions", json={"prompt": f"q{i}"})).json()[
            "worker"] for i in range(2)}
        assert got == {A, B}
        assert (await client.get("/v1/models")).status_code == 200
    run(go())


def test_errors_are_openai_shaped():
    async def go():
        workers = FakeWorkers()
        pool, upstream, client = await _setup(workers)
        r = await client.post("/v1/completions", content=b"{not json",
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/v1/chat/completions", json=[1, 2])
        assert r.status_code == 400
        workers.refusing.update({A, B})
        r = await client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
        assert (await client.get("/health")).status_code == 503
    run(go())


def test_cli_refuses_bad_workers(capsys):
    assert main(["router", "--worker", "worker-a:8000"]) == 2
    assert "http(s) URL" in capsys.readouterr().err
    with pytest.raises(ValueError, match="twice"):
        WorkerPool([A, A])


def test_cli_policy_choices_are_the_routers():
    from tokenmill.distributed.routing import POLICIES
    from tokenmill.router import cli_router
    assert cli_router.POLICIES == POLICIES


def test_responses_follow_their_stored_conversation():
    async def go():
        workers = FakeWorkers()
        _, _, client = await _setup(workers, "round_robin")
        first = (await client.post("/v1/responses", json={"input": "hi"})).json()
        for turn in range(3):  # round robin would alternate; the conversation stays put
            r = (await client.post("/v1/responses", json={
                "input": f"more {turn}", "previous_response_id": first["id"]})).json()
            assert r["worker"] == first["worker"] and r["previous"] == first["id"]
        got = await client.get(f"/v1/responses/{first['id']}")
        assert got.status_code == 200 and got.json()["worker"] == first["worker"]
        missing = await client.get("/v1/responses/resp_nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    run(go())
