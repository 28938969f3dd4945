"""The ``tokenmill bench`` subcommands and their flags.

Only argparse is imported here; each command imports its implementation (torch,
httpx, matplotlib) when it runs, so ``tokenmill --help`` stays fast.
"""

from __future__ import annotations

import argparse

from tokenmill.engine_args import EngineArgs


def _require(module: str, what: str) -> None:
    """A clear error when an optional dependency of ``tokenmill[bench]`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{what} needs the {module} package: "
                         "pip install 'tokenmill[bench]'")


def _serve(a: argparse.Namespace) -> int:
    _require("httpx", "tokenmill bench serve")
    if a.plot:
        _require("matplotlib", "--plot")
    if a.endpoint == "embeddings":
        from tokenmill.bench.embeddings import cmd_bench_embeddings

        return cmd_bench_embeddings(a)
    from tokenmill.bench.serve import cmd_bench_serve

    return cmd_bench_serve(a)


def _throughput(a: argparse.Namespace) -> int:
    from tokenmill.bench.throughput import cmd_bench_throughput

    return cmd_bench_throughput(a)


def _latency(a: argparse.Namespace) -> int:
    from tokenmill.bench.latency import cmd_bench_latency

    return cmd_bench_latency(a)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="benchmark a running OpenAI-compatible server",
        description="Streams a workload to an OpenAI-compatible server (tokenmill, vLLM, "
                    "llama.cpp, ...) and reports throughput, TTFT/TPOT/ITL/E2E latency "
                    "percentiles, goodput and the prefix cache hit rate.")
    g = s.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    g.add_argument("--endpoint", choices=["completions", "chat", "embeddings"], default=None,
                   help="/v1/completions or /v1/chat/completions (default: chat for "
                        "multi-turn, completions otherwise); embeddings: /v1/embeddings "
                        "(inputs/s, tokens/s, latency; --num-prompts inputs of --input-len "
                        "words in requests of --embed-batch)")
    g.add_argument("--embed-batch", type=int, default=32,
                   help="embeddings: inputs per request")
    g.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    d = s.add_argument_group("dataset")
    d.add_argument("--dataset", choices=["random", "shared-prefix", "multi-turn", "grounded"],
                   default="random")
    d.add_argument("--num-prompts", type=int, default=100,
                   help="requests for random and shared-prefix")
    d.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens (shared-prefix: the question after the prefix; "
                        "multi-turn: each user turn; grounded: words of source excerpt)")
    d.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    d.add_argument("--prefix-len", type=int, default=1000,
                   help="shared-prefix: tokens of each group's system prompt")
    d.add_argument("--num-groups", type=int, default=4,
                   help="shared-prefix: distinct system prompts")
    d.add_argument("--num-conversations", type=int, default=8, help="multi-turn: sessions")
    d.add_argument("--turns", type=int, default=4, help="multi-turn: requests per session")
    d.add_argument("--seed", type=int, default=0, help="seeds the prompts and arrivals")
    d.add_argument("--no-calibrate", action="store_true",
                   help="do not probe the server to convert tokens to words; assume one "
                        "token per word")
    r = s.add_argument_group("load")
    r.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests (multi-turn: conversations) per second, Poisson; "
                        "inf sends all at once")
    r.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, <1 burstier")
    r.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: unlimited)")
    q = s.add_argument_group("sampling")
    q.add_argument("--ban-token-ids", default=None,
                   help="comma-separated EOS ids to ban with logit_bias -100, e.g. 0,2 for "
                        "SmolLM2; works with any server. Without it the request carries "
                        "ignore_eos: true and min_tokens = max_tokens = --output-len "
                        "(tokenmill, vLLM)")
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--extra-body", default=None,
                   help='JSON object merged into every request body, e.g. \'{"top_k": 1}\'')
    o = s.add_argument_group("output")
    o.add_argument("--slo", default=None,
                   help="goodput objectives in ms, e.g. ttft=500,tpot=50 (keys ttft, tpot, "
                        "e2e)")
    o.add_argument("--result-json", default=None, help="write metrics + per-request records")
    o.add_argument("--plot", default=None, help="write latency CDFs and throughput, e.g. "
                                                "out.png")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    s.set_defaults(func=_serve)


def _add_offline(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("throughput", help="offline throughput of LLM.generate",
                       description="Random token-id prompts through LLM.generate, EOS "
                                   "ignored; prints requests/s, output and total tokens/s.")
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, default=128)
    t.add_argument("--output-len", type=int, default=128)
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--output-json", default=None, help="write the results as JSON")
    t.add_argument("--disable-tqdm", action="store_true")
    EngineArgs.add_cli_args(t)
    t.set_defaults(func=_throughput)

    lat = sub.add_parser("latency", help="latency of one batch: prefill and decode apart",
                         description="Times one batch of random prompts end to end, the "
                                     "prefill and each decode step, over several "
                                     "iterations.")
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--output-json", default=None, help="write the results as JSON")
    EngineArgs.add_cli_args(lat)
    lat.set_defaults(func=_latency)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench`` with ``serve``, ``throughput`` and ``latency`` under it."""
    b = subparsers.add_parser("bench", help="benchmarks: serve, throughput, latency")
    sub = b.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,"
                                                                         "latency}")
    _add_serve(sub)
    _add_offline(sub)
