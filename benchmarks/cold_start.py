"""Load-to-first-token: from starting a server process to its first generated token.

    python benchmarks/cold_start.py --port 8100 [--runs 3] -- COMMAND ARGS...

Starts COMMAND (a server that will listen on 127.0.0.1:PORT), then sends a one-token
completion (``"prompt": "Hello", "max_tokens": 1``) every 50 ms until one succeeds, and
reports the wall time from the start of the process to that answer: weight loading,
warm-up, server start and the first prefill together, what a user waits for after
typing the command. The process is stopped (SIGTERM) after each run. With ``--runs N``
the median of N runs is reported too (the page cache is warm after the first run, as it
is for a user who starts the same model again).

Example, tokenmill against llama-server on the same file:

    python benchmarks/cold_start.py --port 8100 -- python -m tokenmill serve --model M --port 8100
    python benchmarks/cold_start.py --port 8102 -- llama-server -m M -t 2 --port 8102
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import httpx


def one_run(cmd: list[str], port: int, timeout: float) -> float:
    url = f"http://127.0.0.1:{port}/v1/completions"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                r = httpx.post(url, json={"prompt": "Hello", "max_tokens": 1}, timeout=60)
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"no first token within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    times = [one_run(cmd, a.port, a.timeout) for _ in range(a.runs)]
    print(json.dumps({"command": " ".join(cmd), "seconds": [round(t, 2) for t in times],
                      "median_s": round(statistics.median(times), 2)}))


if __name__ == "__main__":
    main()
