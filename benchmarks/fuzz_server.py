"""A longer fuzzing run of the server than CI's (tests/server/test_fuzz.py), same checks.

    python benchmarks/fuzz_server.py [--scale 4] [--rounds 3 | --minutes 10] [--seed 1]
        [--restart] [--result-json PATH] [--base-url http://127.0.0.1:8000]
        [--max-model-len 256] [--kv-cache-memory 256MiB] [--serve-arg=--flag ...]

Each round fuzzes every operation of CI's plan (``PLAN`` in test_fuzz.py) with ``--scale``
times its examples, under the seed ``--seed + round`` (so rounds differ and each is
reproducible), then sends the hand-written hostile bodies (round 0 only: they are
fixed). Checks, as in CI: 2xx or 4xx only, OpenAI's error shape on every 4xx, strict JSON,
streams that end with [DONE] and carry no server_error; at the end the server must be
idle (running, waiting and KV usage 0), healthy and still serving.

Without ``--base-url`` a server is started here (loopback, free port, the embedded
model) and its log is kept; with ``--restart`` a server that dies (``/health`` no longer
200) is restarted and the run goes on, so one crash does not hide the next. Prints each
distinct problem once (endpoint, status, request body, curl, server log lines) and exits
1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schemathesis  # noqa: E402

from tests.server.fixture import Server, start_server  # noqa: E402
from tests.server.test_fuzz import (  # noqa: E402
    PLAN,
    Fuzzer,
    FuzzReport,
    check_idle_and_healthy,
    hostile_bodies,
)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _NotOurs:
    """Stands for the process of a server this script did not start."""

    returncode = None

    def poll(self) -> None:
        return None


def external_server(base_url: str) -> Server:
    host = urlsplit(base_url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"--base-url must be a loopback address, not {host!r}")
    return Server(_NotOurs(), base_url.rstrip("/"), os.devnull,  # type: ignore[arg-type]
                  api_key=os.environ.get("TOKENMILL_API_KEY"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=4.0,
                   help="examples per operation, as a multiple of CI's plan")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds to run (default: 1, or as many as --minutes allows)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop starting rounds after this long (rounds are then unbounded "
                        "unless --rounds is also given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hostile", action="store_true")
    p.add_argument("--restart", action="store_true",
                   help="restart a server that died and go on (not with --base-url)")
    p.add_argument("--base-url", default=None, help="fuzz this (loopback) server")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra flag for tokenmill serve (repeat; use --serve-arg=--flag)")
    p.add_argument("--result-json", default=None)
    args = p.parse_args()
    if args.restart and args.base_url:
        p.error("--restart needs a server started here (no --base-url)")

    serve_args = ("--kv-cache-memory", args.kv_cache_memory, "--max-model-len",
                  str(args.max_model_len), "--disable-access-log", *args.serve_arg)

    def start() -> Server:
        if args.base_url:
            return external_server(args.base_url)
        s = start_server(*serve_args)
        print(f"server {s.base_url} pid {s.proc.pid}, log {s.log_path}", flush=True)
        return s

    server = start()
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", timeout=30)
    fuzzer = Fuzzer(server)
    total = FuzzReport()
    deaths: list[str] = []
    logs = [server.log_path]
    start_t = time.monotonic()
    deadline = None if args.minutes is None else start_t + 60 * args.minutes
    rounds = args.rounds or (1 if deadline is None else 10**9)

    def revive() -> None:
        nonlocal server, fuzzer
        deaths.append(fuzzer.dead or "?")
        print(f"server died after {fuzzer.dead}", flush=True)
        server.stop(timeout=10)
        fuzzer.close()
        if not args.restart:
            return
        server = start()
        logs.append(server.log_path)
        fuzzer = Fuzzer(server)

    for rnd in range(rounds):
        if deadline is not None and time.monotonic() > deadline:
            break
        seed = args.seed + rnd
        jobs = [(m, path, mode, max(1, round(n * args.scale))) for m, path, mode, n in PLAN]
        for method, path, mode, n in jobs:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            report = fuzzer.fuzz(schema, method, path, mode, n, seed=seed, max_seconds=left)
            total.merge(report)
            print(f"round {rnd} seed {seed} {method} {path} {mode}: {report.summary()}",
                  flush=True)
            if fuzzer.dead:
                revive()
                if fuzzer.dead:  # not restarted
                    break
        if rnd == 0 and not args.no_hostile:
            bodies = hostile_bodies()
            while bodies and not fuzzer.dead:
                report = fuzzer.hostile(bodies)
                total.merge(report)
                print(f"hostile bodies: {report.summary()}", flush=True)
                if not fuzzer.dead:
                    break
                bodies = bodies[report.cases:]  # go on after the one that killed it
                revive()
        if fuzzer.dead:
            break

    after = [] if fuzzer.dead else check_idle_and_healthy(server)
    total.seconds = time.monotonic() - start_t
    print()
    print(total.failure_text() if total.findings else total.summary())
    for d in deaths:
        print(f"server death: {d}")
    for problem in after:
        print(f"after the run: {problem}")
    if not args.base_url:
        code = server.stop()
        if server.exit_code is None and code is None:
            print("server did not exit on SIGTERM (killed)")
        elif code not in (0, None):
            print(f"server exited with status {code} on SIGTERM")
        print("server logs: " + ", ".join(logs))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({
            "cases": total.cases, "seconds": round(total.seconds, 1),
            "statuses": {str(k): v for k, v in total.statuses.items()},
            "problems": [dict(label=f.label, problem=f.problem, status=f.status,
                              count=f.count, request=f.request, curl=f.curl,
                              response=f.response, log=f.log)
                         for f in total.findings.values()],
            "deaths": deaths, "after": after, "server_logs": logs}, indent=2))
    return 1 if (total.findings or after or deaths) else 0


if __name__ == "__main__":
    sys.exit(main())
