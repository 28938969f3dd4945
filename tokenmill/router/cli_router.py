"""``tokenmill router --worker URL --worker URL ...``: one OpenAI endpoint in front of
several ``tokenmill serve`` processes (``app``), with health checks (``workers``).

Imports nothing heavy at parse time (no torch; FastAPI and httpx only when it runs).
"""

from __future__ import annotations

import argparse

# tokenmill.distributed.routing.POLICIES; not imported here: tokenmill.distributed's
# package imports torch, and `tokenmill --help` must not
POLICIES = ("cache_aware", "least_load", "round_robin")


def add_router_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="route OpenAI requests over several tokenmill serve "
                                      "workers (cache-aware)")
    r.add_argument("--worker", action="append", required=True, metavar="URL",
                   help="a worker's base URL, e.g. http://10.0.0.2:8000 (repeat the flag)")
    r.add_argument("--policy", default="cache_aware", choices=list(POLICIES),
                   help="cache_aware: the worker that served the longest prefix of the "
                        "prompt unless the load is imbalanced (default: %(default)s)")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8080)
    r.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between GET /health checks of every worker")
    r.add_argument("--chunk-chars", type=int, default=64,
                   help="characters per edge of the prefix tree (about one KV block of "
                        "text; the router loads no tokenizer)")
    r.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    r.set_defaults(func=cmd_router)


def cmd_router(a: argparse.Namespace) -> int:
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}.")
    if not a.health_interval > 0:
        raise ValueError(f"--health-interval must be > 0, got {a.health_interval}.")
    for url in a.worker:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--worker must be an http(s) URL, got {url!r}.")
    import uvicorn

    from tokenmill.distributed.routing import RouterConfig
    from tokenmill.router.app import build_router_app
    from tokenmill.router.workers import WorkerPool

    pool = WorkerPool(a.worker, RouterConfig(policy=a.policy, chunk=a.chunk_chars),
                      interval=a.health_interval)
    app = build_router_app(pool)
    print(f"tokenmill router on http://{a.host}:{a.port}/v1 over {len(pool.urls)} workers "
          f"({a.policy})", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.uvicorn_log_level)
    return 0
