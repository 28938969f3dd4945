"""The standalone router's HTTP app: OpenAI requests passed through to a chosen worker.

``build_router_app(pool)``:

    POST /v1/completions  /v1/chat/completions  /v1/responses  /tokenize  /detokenize
        the body is read (at most ``max_body_bytes``), parsed as a JSON object, and its
        prompt text (``routing_key``) routed by the pool's policy; the request then goes
        to that worker as it came (body and ``Authorization``) and the worker's answer
        comes back as it is produced (status, content type, bytes; streams chunk by
        chunk). A worker that refuses the connection is marked dead and the request tries
        the next one; a closed client connection closes the upstream one, so the worker
        aborts the request.
    GET /v1/models, /v1/models/{id}, /version   from any healthy worker
    GET|DELETE /v1/responses/{id}, and POST /v1/responses with ``previous_response_id``
        go to the worker that stores that response (the router asks the healthy workers
        ``GET /v1/responses/{id}`` in turn: stored responses live in one worker's memory)
    GET /health    200 while one worker is healthy, else 503
    GET /metrics   the router's own counters (requests and errors per worker, worker up)

The router routes on text, not tokens: it loads no tokenizer, so its prefix tree counts
characters (``--chunk-chars`` per edge, about one KV block of English text). Errors of
its own (bad JSON, no worker) are OpenAI-shaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.router.workers import WorkerPool

logger = logging.getLogger("tokenmill.router")

MAX_BODY_BYTES = 32 * 1024 * 1024
_FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept")
_FORWARD_RESPONSE_HEADERS = ("content-type", "cache-control")
_POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
               "/detokenize")


def error(status: int, message: str, type_: str = "invalid_request_error",
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                   "code": code}}, status_code=status)


def routing_key(body: dict) -> str | list[int]:
    """The text a request's cache use depends on: the prompt, the chat messages' role and
    content in order, or the Responses API's input; token-id prompts as ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return prompt
        if isinstance(prompt[0], str):
            return prompt[0]
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                if not isinstance(content, str):
                    content = json.dumps(content, sort_keys=True)
                parts.append(f"<{m.get('role')}>{content}")
        return "".join(parts)
    for name in ("input", "tokens"):
        if name in body:
            value = body[name]
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return ""


class _RouterCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self):
        up = GaugeMetricFamily("tokenmill_router:worker_up", "1 while the worker is healthy.",
                               labels=["worker"])
        reqs = CounterMetricFamily("tokenmill_router:requests", "Requests sent to the worker.",
                                   labels=["worker"])
        errs = CounterMetricFamily("tokenmill_router:errors",
                                   "Requests that could not be passed to the worker or whose "
                                   "answer broke off.", labels=["worker"])
        for w in self.pool.workers.values():
            up.add_metric([w.url], float(w.healthy))
            reqs.add_metric([w.url], w.requests)
            errs.add_metric([w.url], w.errors)
        matched = CounterMetricFamily("tokenmill_router:prefix_matched_items",
                                      "Prompt characters (or token ids) routed to a worker "
                                      "that had served them before (prefix-tree match).")
        matched.add_metric([], self.pool.router.matched_items)
        yield from (up, reqs, errs, matched)


def build_router_app(pool: WorkerPool, client: httpx.AsyncClient | None = None,
                     max_body_bytes: int = MAX_BODY_BYTES,
                     health_checks: bool = True) -> FastAPI:
    """The router over ``pool``; ``client`` (tests give one with a mock transport) talks
    to the workers."""
    own_client = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    registry = CollectorRegistry()
    registry.register(_RouterCollector(pool))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.check_once(client)
        task = asyncio.create_task(pool.run_health_checks(client)) if health_checks else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if own_client:
            await client.aclose()

    app = FastAPI(title="tokenmill router", lifespan=lifespan)

    async def forward(raw: Request, path: str) -> Response:
        body = await raw.body()
        if len(body) > max_body_bytes:
            return error(413, f"The request body is larger than {max_body_bytes} bytes.")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "The request body is not valid JSON.")
        if not isinstance(payload, dict):
            return error(400, "The request body must be a JSON object.")
        key = routing_key(payload)
        headers = {k: v for k, v in raw.headers.items() if k in _FORWARD_REQUEST_HEADERS}
        tried: set[str] = set()
        previous = payload.get("previous_response_id") if path == "/v1/responses" else None
        owner = await owner_of(previous, headers) if isinstance(previous, str) else None
        while True:
            try:
                if owner is not None:  # the conversation is stored on that worker
                    url, owner = owner, None
                    pool.router.tree.insert(key, url)
                else:
                    url = pool.router.route(key, exclude=frozenset(tried))
            except LookupError:
                return error(503, "No worker is available; retry later.", "server_error",
                             "no_worker")
            pool.router.started(url)
            worker = pool.workers[url]
            request = client.build_request("POST", url + path, content=body, headers=headers)
            try:
                upstream = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                pool.router.finished(url)
                worker.errors += 1
                pool.mark_dead(url, f"connecting failed: {type(e).__name__}")
                tried.add(url)
                continue
            except httpx.HTTPError as e:
                pool.router.finished(url)
                worker.errors += 1
                return error(502, f"The worker failed before answering: {type(e).__name__}.",
                             "server_error", "worker_failed")
            worker.requests += 1
            break
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_bytes():  # decoded: no content-encoding passes
                    yield chunk
            except httpx.HTTPError as e:
                worker.errors += 1
                logger.warning("worker %s broke off an answer: %s", url, e)
                if streaming:
                    frame = {"error": {"message": "The worker serving this stream failed.",
                                       "type": "server_error", "param": None,
                                       "code": "worker_failed"}}
                    yield f"data: {json.dumps(frame)}\n\ndata: [DONE]\n\n".encode()
            finally:
                await upstream.aclose()
                pool.router.finished(url)

        out_headers = {k: v for k, v in upstream.headers.items()
                       if k in _FORWARD_RESPONSE_HEADERS}
        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 headers=out_headers)

    async def owner_of(response_id: str, headers: dict) -> str | None:
        """The healthy worker that stores response ``response_id`` (asked one by one: the
        router keeps no state of its own)."""
        for url in pool.healthy():
            try:
                r = await client.get(f"{url}/v1/responses/{response_id}", headers=headers,
                                     timeout=10.0)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return url
        return None

    async def stored_response(raw: Request, response_id: str) -> Response:
        headers = {k: v for k, v in raw.headers.items() if k in _FORWARD_REQUEST_HEADERS}
        url = await owner_of(response_id, headers)
        if url is None:
            return error(404, f"No response with id {response_id!r} is stored on any worker.",
                         code="not_found")
        r = await client.request(raw.method, f"{url}/v1/responses/{response_id}",
                                 headers=headers, timeout=10.0)
        return Response(r.content, status_code=r.status_code,
                        media_type=r.headers.get("content-type"))

    app.add_api_route("/v1/responses/{response_id}", stored_response,
                      methods=["GET", "DELETE"])

    for path in _POST_PATHS:
        async def endpoint(raw: Request, _path: str = path) -> Response:
            return await forward(raw, _path)
        app.add_api_route(path, endpoint, methods=["POST"])

    async def from_any(raw: Request) -> Response:
        headers = {k: v for k, v in raw.headers.items() if k in _FORWARD_REQUEST_HEADERS}
        for url in pool.healthy():
            try:
                r = await client.get(url + raw.url.path, headers=headers, timeout=10.0)
            except httpx.HTTPError as e:
                pool.mark_dead(url, f"GET failed: {type(e).__name__}")
                continue
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type"))
        return error(503, "No worker is available; retry later.", "server_error", "no_worker")

    app.add_api_route("/v1/models", from_any, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", from_any, methods=["GET"])
    app.add_api_route("/version", from_any, methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if pool.healthy() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
