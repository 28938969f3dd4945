"""Starts the real ``tokenmill serve`` in a subprocess on a free loopback port, for tests.

The server is run exactly as a user would run it (``python -m tokenmill serve ...``), its
output goes to a log file (so a chatty server can never block on a full pipe), and
stopping it is part of the test: SIGTERM (or SIGINT) must make it exit with status 0
(graceful shutdown is in the spec).

Below the fixture: small helpers for talking to it (OpenAI error bodies, SSE framing,
Prometheus samples from /metrics, polling).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

# Servers started by this test process and not yet stopped, and those stopped during the
# current test: a failing test gets their logs attached to its report
# (tests/server/conftest.py, which also empties STOPPED_SERVERS after each test).
LIVE_SERVERS: list[Server] = []
STOPPED_SERVERS: list[Server] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server process and how to reach it."""

    proc: subprocess.Popen
    base_url: str
    log_path: str
    api_key: str | None = None
    args: tuple[str, ...] = ()
    exit_code: int | None = field(default=None)
    final_log: str | None = field(default=None)  # the whole log, kept once it is deleted

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of the server's stdout+stderr."""
        if self.final_log is not None:
            return self.final_log[-tail:]
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-tail:]
        except OSError as e:
            return f"<no log: {e}>"

    def stop(self, timeout: float = STOP_TIMEOUT_S,
             sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Sends ``sig`` and waits; returns the exit code, or None if it had to be killed."""
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)
            STOPPED_SERVERS.append(self)
        if self.exit_code is not None or self.proc.poll() is not None:
            if self.exit_code is None:
                self.exit_code = self.proc.returncode
            return self.exit_code
        self.proc.send_signal(sig)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        return self.exit_code


def start_server(*args: str, api_key: str | None = None,
                 ready_timeout: float = READY_TIMEOUT_S) -> Server:
    """Starts ``python -m tokenmill serve *args`` and waits until GET /health answers 200.

    Raises RuntimeError (with the server's log) if the process dies or is not ready in time.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill", "serve", *args,
           "--host", "127.0.0.1", "--port", str(port)]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    fd, log_path = tempfile.mkstemp(prefix="tokenmill-serve-", suffix=".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TOKENMILL_API_KEY", None)  # only --api-key decides whether auth is on
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, api_key, tuple(args))
    LIVE_SERVERS.append(server)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was "
                               f"ready\ncommand: {' '.join(cmd)}\n--- server log ---\n"
                               f"{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"server not ready after {ready_timeout:.0f} s\ncommand: "
                               f"{' '.join(cmd)}\n--- server log ---\n{server.log()}")
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(*args: str, api_key: str | None = None,
                   stop_signal: signal.Signals = signal.SIGTERM) -> Iterator[Server]:
    """Yields a ready server; on exit sends ``stop_signal`` (SIGTERM unless told otherwise)
    and asserts a clean exit (status 0)."""
    server = start_server(*args, api_key=api_key)
    try:
        yield server
    finally:
        code = server.stop(sig=stop_signal)
        log = server.log()
        server.final_log = server.log(tail=10**9)
        with contextlib.suppress(OSError):
            os.unlink(server.log_path)
    name = stop_signal.name
    assert code is not None, (f"server did not exit within {STOP_TIMEOUT_S:.0f} s of {name} "
                              f"(killed)\n--- server log ---\n{log}")
    assert code == 0, f"server exited with status {code} after {name}\n--- server log ---\n{log}"


# ----------------------------------------------------------------------------- helpers

def parallel(*fns: Callable[[], Any]) -> list[Any]:
    """Runs the calls at once (so the server batches them) and returns their results."""
    with ThreadPoolExecutor(len(fns)) as ex:
        futures = [ex.submit(f) for f in fns]
        return [f.result() for f in futures]


def post(server: Server, path: str, body: Any = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 120) -> httpx.Response:
    hdrs = {**server.headers, **(headers or {})}
    if content is not None:
        hdrs.setdefault("Content-Type", "application/json")
        return httpx.post(server.base_url + path, content=content, headers=hdrs,
                          timeout=timeout)
    return httpx.post(server.base_url + path, json=body, headers=hdrs, timeout=timeout)


def error_of(r: httpx.Response, status: int) -> dict:
    """Checks the status and OpenAI's error shape; returns the inner error object."""
    assert r.status_code == status, (
        f"{r.request.method} {r.request.url.path}: expected {status}, got {r.status_code}: "
        f"{r.text[:600]}")
    try:
        body = r.json()
    except json.JSONDecodeError:
        pytest.fail(f"error body is not JSON: {r.text[:600]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    missing = {"message", "type", "param", "code"} - set(err)
    assert not missing, f"error object lacks {sorted(missing)}: {body}"
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    return err


def names(err: dict, name: str) -> bool:
    """True when the error names ``name``: in ``param``, or as a word in the message."""
    word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")
    return bool(word.search(str(err.get("param") or ""))) or bool(word.search(err["message"]))


def sse_payloads(body: str) -> list[str]:
    """Splits an OpenAI SSE body into its ``data:`` payloads, checking the framing."""
    assert body.endswith("data: [DONE]\n\n"), f"stream does not end with [DONE]: {body[-300:]!r}"
    frames = body.split("\n\n")
    assert frames[-1] == "", repr(body[-200:])
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame, f"bad SSE frame {frame!r}"
        payloads.append(frame[len("data: "):])
    assert payloads.count("[DONE]") == 1
    return payloads


def scrape(server: Server) -> dict:
    r = httpx.get(server.base_url + "/metrics", headers=server.headers, timeout=10)
    assert r.status_code == 200, r.text[:500]
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(fams: dict, sample_name: str, **labels: str) -> float | None:
    """Sum of the samples called ``sample_name`` whose labels match; None if there are none."""
    values = [s.value for f in fams.values() for s in f.samples
              if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else None


def load(server: Server) -> tuple[float | None, float | None, float | None]:
    """(num_requests_running, num_requests_waiting, kv_cache_usage_perc) from /metrics."""
    fams = scrape(server)
    return (sample(fams, "tokenmill:num_requests_running"),
            sample(fams, "tokenmill:num_requests_waiting"),
            sample(fams, "tokenmill:kv_cache_usage_perc"))


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Polls ``pred`` until it returns a truthy value; returns the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_idle(server: Server, timeout: float = 10.0) -> tuple:
    last: list[tuple] = []

    def idle() -> bool:
        last[:] = [load(server)]
        return last[0] == (0, 0, 0)

    wait_until(idle, timeout)
    return last[0]
