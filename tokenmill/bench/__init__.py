"""``tokenmill bench``: serve (any OpenAI-compatible server), throughput and latency
(the engine in-process). ``add_bench_parser`` wires them into the CLI."""

from tokenmill.bench.parser import add_bench_parser

__all__ = ["add_bench_parser"]
