"""``tokenmill serve [MODEL]``: load the engine and serve it over HTTP with uvicorn.

Start-up order: parse and check the flags, load the model (seconds), print what is
served (model, dtype, KV capacity, URL), then hand over to uvicorn, whose lifespan
starts the engine thread.

Connections: uvicorn's h11 protocol with a time-out on the request head and a cap of
``--max-connections`` open connections (a request beyond them gets 503), and a client that
reads none of its response for ``--stream-stall-timeout`` seconds dropped
(``http_guard.guarded_h11_protocol``), and the app's own bounds on the body
(``--max-request-body-bytes``, ``--request-read-timeout``); see ``limits``.

Shutdown: on SIGINT or SIGTERM uvicorn stops accepting connections, lets the open ones
finish (up to ``--shutdown-timeout`` seconds, then cancels them, which aborts their
requests), and runs the lifespan's ``AsyncEngine.shutdown``. uvicorn then re-raises the
signal for the previous handler; we make that handler a no-op so a graceful stop exits
with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator

from tokenmill.engine_args import EngineArgs
from tokenmill.server.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_SEQUENCES,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_REQUEST_READ_TIMEOUT_S,
    DEFAULT_STREAM_STALL_TIMEOUT_S,
)

# Idle keep-alive connections: a client that reuses a connection at the moment the server
# closes it gets a reset instead of a response. httpx, and the openai client built on it,
# drop idle connections after 5 s, which is also uvicorn's default keep-alive timeout: a
# request sent after ~5 s of quiet could meet the close. The server waits longer than
# common clients keep idle connections (as servers behind load balancers do), so the
# client always gives up first.
KEEP_ALIVE_S = 75.0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF folder or .gguf file (same as --model)")
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use in 'model' (default: the model path as given, "
                        "or SmolLM2-135M-Instruct for the embedded model)")
    g.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $TOKENMILL_API_KEY)")
    g.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_SEQUENCES,
                   help="queued sequences (a request counts prompts x n) beyond this get "
                        "HTTP 429; 0: no limit (default: %(default)s)")
    g.add_argument("--max-request-body-bytes", type=int,
                   default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                   help="larger request bodies get HTTP 413 (default: %(default)s)")
    g.add_argument("--request-read-timeout", type=float,
                   default=DEFAULT_REQUEST_READ_TIMEOUT_S,
                   help="seconds a client has to send a request's head, and then its body; "
                        "a connection still sending its head is closed, a body gets HTTP "
                        "408 (default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="open connections (and requests in flight) beyond this get HTTP "
                        "503 (default: %(default)s)")
    g.add_argument("--stream-stall-timeout", type=float,
                   default=DEFAULT_STREAM_STALL_TIMEOUT_S,
                   help="seconds a client may leave its response unread (a stream it stopped "
                        "reading) before its connection is dropped and its request aborted; "
                        "0: never (default: %(default)s)")
    g.add_argument("--allow-request-priority", action="store_true",
                   help="let requests set 'priority' (lower runs first, |priority| <= "
                        "1000); otherwise a non-zero priority is HTTP 400")
    g.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="read special-token text in chat messages (<|im_end|>) as control "
                        "tokens, as older servers did; by default only the chat template's "
                        "own markup makes special tokens")
    g.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="split <think>...</think> off chat replies into reasoning_content "
                        "(and reasoning items on /v1/responses); deepseek_r1: replies start "
                        "inside the think block; qwen3: when the prompt opened it")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    g.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S,
                   help="seconds an idle keep-alive connection stays open; longer than "
                        "HTTP clients keep idle connections, so that a client never sends "
                        "a request on a connection the server is closing (default: "
                        f"{KEEP_ALIVE_S:g})")
    g.add_argument("--routing-policy", default="cache_aware",
                   choices=["cache_aware", "least_load", "round_robin"],
                   help="with --data-parallel-size > 1: how a request picks its replica; "
                        "cache_aware: the replica that served the longest prefix of its "
                        "prompt unless the load is imbalanced (default: %(default)s)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-access-log", action="store_true",
                   help="do not log every HTTP request")
    EngineArgs.add_cli_args(s)
    s.set_defaults(func=cmd_serve)


def _check(a: argparse.Namespace) -> None:
    if a.model_tag is not None:
        if a.model is not None and a.model != a.model_tag:
            raise ValueError(f"the model is given twice, as {a.model_tag!r} and as --model "
                             f"{a.model!r}; pass one.")
        a.model = a.model_tag
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}.")
    if a.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0 (0: no limit), got "
                         f"{a.max_queued_requests}.")
    if a.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got "
                         f"{a.max_request_body_bytes}.")
    if not a.request_read_timeout > 0:
        raise ValueError(f"--request-read-timeout must be > 0, got {a.request_read_timeout}.")
    if a.stream_stall_timeout < 0:
        raise ValueError(f"--stream-stall-timeout must be >= 0 (0: never), got "
                         f"{a.stream_stall_timeout}.")
    if a.max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {a.max_connections}.")
    if a.timeout_keep_alive <= 0:
        raise ValueError(f"--timeout-keep-alive must be > 0, got {a.timeout_keep_alive}.")
    if a.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {a.shutdown_timeout}.")


def default_served_name(model: str | None, model_path: str) -> str:
    """The model path as the user gave it (vLLM's rule); for the embedded model, its
    name without the quantization suffix."""
    if model is not None:
        return model
    return os.path.basename(model_path).split(".")[0]


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def banner(engine, names: list[str], url: str, api_key: bool) -> str:
    """What is served, in a few lines."""
    cfg, mc = engine.engine_config, engine.model_config
    dtype = str(cfg.dtype).removeprefix("torch.")
    return "\n".join([
        f"tokenmill serving {', '.join(names)}",
        f"  model     {cfg.model} ({mc.architecture})",
        f"  dtype     {dtype} on {cfg.device}",
        "  KV cache  " + _kv_cache_line(engine, cfg.scheduler.max_num_seqs),
        f"  URL       {url}/v1  (OpenAI base URL; also /health /metrics /docs)"
        + ("  [API key required]" if api_key else ""),
    ])


def _kv_cache_line(engine, max_num_seqs: int) -> str:
    if hasattr(engine, "kv_cache_line"):  # data-parallel replicas
        return engine.kv_cache_line(engine.max_model_len, max_num_seqs)
    return engine.engine.runner.kv_cache_line(engine.max_model_len, max_num_seqs)


def _start_engine(a: argparse.Namespace, max_queued: int | None):
    """One engine in this process, or ``--data-parallel-size`` replicas behind a router."""
    flags = dataclasses.asdict(EngineArgs.from_cli_args(a))
    if flags["data_parallel_size"] > 1 or flags["tensor_parallel_size"] > 1:
        from tokenmill.distributed.routing import RouterConfig
        from tokenmill.replicas.dp_engine import DataParallelEngine
        return DataParallelEngine.from_flags(router=RouterConfig(policy=a.routing_policy),
                                             max_queued_requests=max_queued, **flags)
    from tokenmill.engine.async_engine import AsyncEngine
    return AsyncEngine.from_flags(max_queued_requests=max_queued, **flags)


@contextlib.contextmanager
def _graceful_signals_exit_zero() -> Iterator[None]:
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_embeddings(a: argparse.Namespace, flags: EngineArgs) -> int:
    """``tokenmill serve`` for an encoder: the embeddings/score/rerank app."""
    import uvicorn

    from tokenmill.engine.embedding_engine import AsyncEmbeddingEngine, embedding_engine
    from tokenmill.server.app import build_embedding_app
    from tokenmill.server.http_guard import guarded_h11_protocol
    from tokenmill.server.limits import DEFAULT_MAX_QUEUED_INPUTS, ServerLimits

    engine = AsyncEmbeddingEngine(embedding_engine(flags), DEFAULT_MAX_QUEUED_INPUTS)
    names = a.served_model_name or [default_served_name(a.model, flags.model)]
    limits = ServerLimits(max_request_body_bytes=a.max_request_body_bytes,
                          request_read_timeout=a.request_read_timeout)
    app = build_embedding_app(engine, names, api_key=a.api_key, limits=limits)
    print(f"Serving {names[0]} (embeddings; {engine.engine.architecture}, "
          f"{engine.engine.max_model_len} tokens per input) at "
          f"{base_url(a.host, a.port)}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, host=a.host, port=a.port, log_level=a.uvicorn_log_level,
        access_log=not a.disable_access_log, timeout_keep_alive=a.timeout_keep_alive,
        timeout_graceful_shutdown=a.shutdown_timeout,
        http=guarded_h11_protocol(a.request_read_timeout, a.max_connections,
                                  a.stream_stall_timeout or None)))
    with _graceful_signals_exit_zero():
        server.run()
    return 0 if server.started else 1


def cmd_serve(a: argparse.Namespace) -> int:
    _check(a)
    import uvicorn

    from tokenmill.server.app import build_app
    from tokenmill.server.http_guard import guarded_h11_protocol
    from tokenmill.server.limits import ServerLimits

    max_queued = a.max_queued_requests or None
    flags = EngineArgs.from_cli_args(a)
    from tokenmill.engine.embedding_engine import resolve_task

    if resolve_task(flags) == "embed":
        return _serve_embeddings(a, flags)
    engine = _start_engine(a, max_queued)
    names = a.served_model_name or [default_served_name(a.model, engine.engine_config.model)]
    limits = ServerLimits(max_request_body_bytes=a.max_request_body_bytes,
                          request_read_timeout=a.request_read_timeout,
                          max_queued_sequences=max_queued,
                          allow_request_priority=a.allow_request_priority,
                          allow_special_tokens_in_content=a.allow_special_tokens_in_content)
    app = build_app(engine, names, api_key=a.api_key, shutdown_timeout=a.shutdown_timeout,
                    limits=limits, reasoning_parser=a.reasoning_parser)
    print(banner(engine, names, base_url(a.host, a.port), bool(a.api_key)), flush=True)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.uvicorn_log_level,
                            access_log=not a.disable_access_log,
                            timeout_keep_alive=a.timeout_keep_alive,
                            timeout_graceful_shutdown=a.shutdown_timeout,
                            http=guarded_h11_protocol(a.request_read_timeout,
                                                      a.max_connections,
                                                      a.stream_stall_timeout or None))
    server = uvicorn.Server(config)
    with _graceful_signals_exit_zero():
        server.run()
    return 0 if server.started else 1

