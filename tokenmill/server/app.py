"""The FastAPI app: routes, API-key check, and the engine's life inside the server's.

``build_app(engine, model_names)`` wires the OpenAI endpoints to their handlers
(``serving_completions``, ``serving_chat``) and adds vLLM's utility endpoints:

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models[/{id}]
    GET  /health                GET  /version                 GET /metrics
    POST /tokenize              POST /detokenize
    POST /v1/responses          GET|DELETE /v1/responses/{id}  (``serving_responses``)
    GET  /                      the chat page (``web_ui``; no key needed, it holds no data)

The lifespan starts the engine thread when the server starts and, on shutdown (after
uvicorn has stopped accepting connections and let the open ones finish), stops it with
``AsyncEngine.shutdown``; it also warms up the grammar backend (structured outputs) in the
background. Handlers never call into the engine loop directly: they only
tokenize (off the event loop) and await ``AsyncEngine.generate``.

Before any handler: the API-key check, then ``RequestBodyMiddleware`` (body size and read
time-out), then ``JSONBodyRoute`` (Content-Type and a strict JSON parse); see ``limits``.
Clients name the model by a served name only; ``/v1/models`` reports no file path.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

import tokenmill
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.embedding_engine import AsyncEmbeddingEngine
from tokenmill.server.errors import (
    authentication_failed,
    install_exception_handlers,
    invalid_request,
)
from tokenmill.server.http_guard import JSONBodyRoute, RequestBodyMiddleware
from tokenmill.server.limits import ServerLimits
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.server.protocol_embeddings import (
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    TaskModelCard,
    TaskModelList,
)
from tokenmill.server.response_store import ResponseStore
from tokenmill.server.serving_chat import ChatHandler, chat_prompt_ids
from tokenmill.server.serving_completions import CompletionHandler
from tokenmill.server.serving_context import ServingContext, json_response
from tokenmill.server.serving_embeddings import EmbeddingHandler, EncoderContext
from tokenmill.server.serving_responses import add_responses_routes
from tokenmill.server.serving_score import ScoreHandler
from tokenmill.server.web_ui import PUBLIC_PATHS, add_web_ui

OPEN_PATHS = frozenset({"/health"}) | PUBLIC_PATHS

# What /openapi.json says each operation can answer besides 200 (FastAPI's 422 is never
# sent: validation errors are 400s in OpenAI's shape).
_BODY_ERRORS = {"400": "invalid request (the message and param name the field)",
                "404": "unknown model name", "408": "body not received in time",
                "413": "body too large", "415": "Content-Type is not application/json"}
_ERROR_RESPONSES = {
    ("post", "/v1/completions"): {**_BODY_ERRORS, "429": "queue full, retry later"},
    ("post", "/v1/chat/completions"): {**_BODY_ERRORS, "429": "queue full, retry later"},
    ("post", "/tokenize"): _BODY_ERRORS,
    ("post", "/detokenize"): _BODY_ERRORS,
    ("get", "/v1/models/{model_id}"): {"404": "unknown model name"},
    ("post", "/v1/responses"): {**_BODY_ERRORS, "404": "unknown model name or "
                                "previous_response_id", "429": "queue full, retry later"},
    ("get", "/v1/responses/{response_id}"): {"404": "unknown, deleted or expired response"},
    ("delete", "/v1/responses/{response_id}"): {"404": "unknown, deleted or expired response"},
}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "title": "ErrorResponse",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
}


def _declare_openai_errors(app: FastAPI, api_key: bool) -> None:
    """Rewrites the generated OpenAPI document's error responses to what is sent."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorResponse"] = _ERROR_SCHEMA
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in spec.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                errors = dict(_ERROR_RESPONSES.get((method, path), {}))
                if api_key and path not in OPEN_PATHS:
                    errors["401"] = "missing or wrong API key"
                errors["503"] = "too many open connections (--max-connections)"
                for code, text in sorted(errors.items()):
                    responses[code] = {"description": text, "content": ref}
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer KEY`` on every HTTP route but /health and the page.

    Plain ASGI (not BaseHTTPMiddleware), so streaming responses and client-disconnect
    detection pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                response = authentication_failed(given is not None).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded_app(lifespan, limits: ServerLimits, api_key: str | None) -> FastAPI:
    """An app with the strict JSON route class, OpenAI-shaped errors, and the body and
    API-key middleware."""
    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)
    app.router.route_class = JSONBodyRoute
    install_exception_handlers(app)
    # the last added runs first: the API key, then the body's size and read time-out
    app.add_middleware(RequestBodyMiddleware, max_body_bytes=limits.max_request_body_bytes,
                       read_timeout=limits.request_read_timeout)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def build_app(engine: AsyncEngine, model_names: list[str], api_key: str | None = None,
              shutdown_timeout: float = 30.0, limits: ServerLimits | None = None,
              reasoning_parser: str | None = None) -> FastAPI:
    """The server for ``engine``. ``model_names`` are the names clients may put in
    "model" (the first is reported back); ``limits`` the operator's bounds;
    ``reasoning_parser`` (qwen3, deepseek_r1) splits think blocks off chat replies."""
    if not model_names:
        raise ValueError("model_names needs at least one name to serve the model under.")
    limits = limits or ServerLimits()
    metrics = ServerMetrics(model_names[0], engine.stats,
                            getattr(engine, "replica_stats", None))  # data parallel
    ctx = ServingContext(engine, list(model_names), metrics, limits)
    completions, chat = CompletionHandler(ctx), ChatHandler(ctx, reasoning_parser)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        warm_up = None
        if engine.tokenizer is not None:
            # import the grammar library now, not on the first constrained request
            warm_up = engine.structured_outputs.warm_up()
        yield
        await engine.shutdown(timeout=shutdown_timeout)
        ctx.close()
        if warm_up is not None:
            # never exit while that import runs (~1 s): a daemon thread stopped inside
            # C++ start-up code can abort the interpreter's exit
            await asyncio.to_thread(warm_up.join, 30.0)

    app = _guarded_app(lifespan, limits, api_key)
    app.state.ctx = ctx

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completions.create(body, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    add_responses_routes(app, chat, ResponseStore())

    def card(name: str) -> ModelCard:
        # root: the served name, not the model's file path (which clients need not know)
        return TaskModelCard(id=name, created=started, root=ctx.model_name,
                             max_model_len=ctx.max_model_len, task="generate")

    _add_model_routes(app, ctx.model_names, card, ctx.check_model, lambda: engine.is_running)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(body: Annotated[TokenizeRequest, Body()]) -> Response:
        """vLLM's shapes: ``{"prompt"}`` or ``{"messages"}`` (rendered with the chat
        template), plus ``add_special_tokens``."""
        tok = ctx.tokenizer
        if isinstance(body, TokenizeChatRequest):
            chat_req = body
            ctx.check_model(chat_req.model)
            tools = [t.model_dump(exclude_none=True) for t in chat_req.tools or []] or None
            ids = await ctx.off_loop(
                chat_prompt_ids, tok, chat_req.messages, chat_req.add_generation_prompt,
                chat_req.chat_template_kwargs, chat_req.add_special_tokens, tools,
                ctx.limits.allow_special_tokens_in_content)
            want_strs = chat_req.return_token_strs
        else:
            req = body
            ctx.check_model(req.model)
            try:
                ids = await ctx.off_loop(tok.encode, req.prompt, req.add_special_tokens)
            except ValueError as e:  # not valid Unicode
                raise invalid_request(f"Invalid value for 'prompt': {e}", "prompt") from e
            want_strs = req.return_token_strs
        return json_response(TokenizeResponse(
            count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
            token_strs=tok.convert_ids_to_tokens(ids) if want_strs else None))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.check_model(body.model)
        if body.tokens:
            ctx.check_token_ids(body.tokens, "tokens")
        text = await ctx.off_loop(ctx.tokenizer.decode, body.tokens, False)
        return json_response(DetokenizeResponse(prompt=text))

    _refuse_routes(app, ENCODER_ROUTES, "is served for generation (completions, chat); "
                   "serve an embedding model, or this one with --task embed, for {path}")
    add_web_ui(app)
    _declare_openai_errors(app, bool(api_key))
    return app


ENCODER_ROUTES = ("/v1/embeddings", "/v1/score", "/score", "/rerank", "/v1/rerank")
GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


def _add_model_routes(app: FastAPI, model_names: list[str], card: Callable[[str], Any],
                      check_model: Callable[[str], None],
                      is_running: Callable[[], bool]) -> None:
    """GET /v1/models[/{id}] (``card`` describes one served name), /health, /version."""
    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(TaskModelList(data=[card(n) for n in model_names]))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        check_model(model_id)
        return json_response(card(model_id))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if is_running() else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": tokenmill.__version__}


def _refuse_routes(app: FastAPI, paths: tuple[str, ...], why: str) -> None:
    """POST ``paths`` answer a 400 in OpenAI's shape saying the served model does not do
    that task (``why`` is formatted with the path)."""
    def refuse(path: str):
        async def refused(raw: Request) -> Response:
            raise invalid_request(f"The model {why.format(path=path)}.", "model")
        return refused

    for path in paths:
        app.add_api_route(path, refuse(path), methods=["POST"], include_in_schema=False)


def build_embedding_app(engine: AsyncEmbeddingEngine, model_names: list[str],
                        api_key: str | None = None,
                        limits: ServerLimits | None = None) -> FastAPI:
    """The server for an encoder (``--task embed``): ``/v1/embeddings``, ``/v1/score``,
    ``/rerank`` and ``/v1/rerank`` (``serving_embeddings``, ``serving_score``), the model
    list, /health and /version; the generation endpoints answer a 400."""
    if not model_names:
        raise ValueError("model_names needs at least one name to serve the model under.")
    limits = limits or ServerLimits()
    ctx = EncoderContext(engine, list(model_names))
    embeddings, scores = EmbeddingHandler(ctx), ScoreHandler(ctx)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = _guarded_app(lifespan, limits, api_key)

    @app.post("/v1/embeddings")
    async def create_embedding(body: EmbeddingRequest) -> Response:
        return json_response(await embeddings.create(body))

    @app.post("/v1/score")
    async def create_score(body: ScoreRequest) -> Response:
        return json_response(await scores.score(body))

    app.add_api_route("/score", create_score, methods=["POST"], include_in_schema=False)

    @app.post("/rerank")
    async def rerank(body: RerankRequest) -> Response:
        return json_response(await scores.rerank(body))

    app.add_api_route("/v1/rerank", rerank, methods=["POST"], include_in_schema=False)

    def card(name: str) -> TaskModelCard:
        return TaskModelCard(id=name, created=started, root=ctx.model_name,
                             max_model_len=engine.engine.max_model_len, task="embed")

    _add_model_routes(app, ctx.model_names, card, ctx.check_model, lambda: engine.is_running)

    _refuse_routes(app, GENERATE_ROUTES, "is an embedding model: it does not generate "
                   "text; use /v1/embeddings, /v1/score or /rerank instead of {path}")
    _declare_openai_errors(app, bool(api_key))
    return app
