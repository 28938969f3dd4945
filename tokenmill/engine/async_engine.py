"""The asyncio front of the engine, for the server.

The engine loop runs in its own thread: a step is seconds of PyTorch work on a CPU and
must never block the HTTP event loop (PyTorch releases the GIL while it computes).
Threads talk through two channels:

- an *inbox* (a thread-safe queue) of commands, add and abort, that the engine thread
  applies between steps, so the scheduler is only ever touched by that thread;
- one ``Mailbox`` per request, filled from the engine thread with
  ``loop.call_soon_threadsafe`` after every step that touched the request. Outputs are
  cumulative (each carries the whole text so far), so the mailbox keeps only the latest:
  a client that reads every step sees every step, one that stops reading costs one output,
  not one per step.

A request that fails (``finish_reason`` "error": its data broke a step, its grammar was too
expensive or did not compile) ends its stream with ``RequestFailedError``; the others go
on. Only a loop that cannot step at all (``MAX_STEP_FAILURES`` failures in a row that no
request could be blamed for) is dead: every stream, then every new request, gets
``EngineDeadError``.

The engine is built in that thread too (``from_flags``), so it is the only thread that ever
runs parallel (OpenMP) work. libgomp keeps a pool of worker threads per thread that starts
parallel regions; with pools in two threads it counts more threads than cores and stops
spinning at barriers, so every region hands over through futexes. Measured on 2 cores: a
packed matmul at batch 1 took 50 us from a single computing thread and 165-385 us from a
second one; a whole decode step was ~5x slower.

``generate()`` validates the request in the caller's thread (tokenization and length
checks read only immutable engine state), so a bad request fails with ValueError before
it is queued. When the consumer stops early (client disconnect: the async generator is
closed or its task cancelled), an abort command frees the request's blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import Engine, Request
from tokenmill.engine.spec_decode import SpecDecodeStats
from tokenmill.engine_args import EngineArgs
from tokenmill.loader.default_model import with_default_model
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill")


class QueueFullError(Exception):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop crashed; no request can be served (HTTP 500)."""


class RequestFailedError(RuntimeError):
    """This request failed in the engine (HTTP 500 for it alone); ``output`` is its last
    state, with ``finish_reason`` "error" and the reason in ``stop_reason``."""

    def __init__(self, message: str, output: RequestOutput | None = None) -> None:
        super().__init__(message)
        self.output = output


MAX_STEP_FAILURES = 3  # steps in a row raising outside any request: the engine is dead


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_queued: int          # waiting in the scheduler + not yet picked up by the loop
    kv_cache_usage: float    # fraction of KV blocks in use
    num_preemptions: int     # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0     # of which found cached
    kv_cache_touched: float = 0.0  # fraction of KV blocks ever used (resident pages)
    spec_decode: SpecDecodeStats | None = None  # speculative decoding's counters, if on


_STOP = object()


class Mailbox:
    """One stream's buffer: the latest item only (outputs are cumulative). A final item
    (a finished output or an exception) is never replaced. Used on its event loop only."""

    __slots__ = ("_item", "_full", "_event")

    def __init__(self) -> None:
        self._item = None
        self._full = False
        self._event = asyncio.Event()

    def put_nowait(self, item) -> None:
        if self._full and _is_final(self._item):
            return
        self._item, self._full = item, True
        self._event.set()

    async def get(self):
        while not self._full:
            await self._event.wait()
            self._event.clear()
        item, self._item, self._full = self._item, None, False
        self._event.clear()
        return item

    def qsize(self) -> int:
        return int(self._full)


def _is_final(item) -> bool:
    return isinstance(item, BaseException) or getattr(item, "finished", False)


class AsyncEngine:
    def __init__(self, engine: Engine | None, max_queued_requests: int | None = None) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Mailbox]] = {}
        self._pending_adds = 0  # added by generate(), not yet taken by the loop
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._dead: BaseException | None = None
        self.integrity_failures = 0  # idle-time check_integrity() failures (should stay 0)
        # tensor parallel (tokenmill.replicas.tensor_parallel): called by the engine thread
        # with the commands it applied before each loop turn (None when stopping), so the
        # other ranks apply the same and step in lockstep
        self.step_sync: Callable[[list | None], None] | None = None
        self._specs: dict[str, tuple] = {}
        self._applied: list = []

    @classmethod
    def from_flags(cls, max_queued_requests: int | None = None, show_progress: bool = True,
                   **engine_flags) -> AsyncEngine:
        """Builds the engine in the engine thread (see the module docstring) and returns
        once it is ready; errors (a bad flag, a missing model) are raised here."""
        # bad flags fail in the caller
        config = EngineConfig.from_args(with_default_model(EngineArgs(**engine_flags)))
        self = cls(None, max_queued_requests)
        self._start_thread(lambda: Engine(config, show_progress))
        return self

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._start_thread(None)

    def _start_thread(self, build) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                if build is not None:
                    self.engine = build()
            except BaseException as e:
                failure.append(e)
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=main, name="tokenmill-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting requests, lets the running ones finish (aborting what is left
        after ``timeout`` seconds), then stops the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)
        self._inbox.put(_STOP)
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    # ---- what the server reads (fixed once the engine is built) ------------------------
    @property
    def tokenizer(self):
        """The engine's ``Tokenizer`` (None when it runs on token ids only)."""
        return self.engine.tokenizer

    @property
    def engine_config(self) -> EngineConfig:
        return self.engine.config

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def structured_outputs(self):
        """The grammar manager: parse and compile constraints (thread-safe)."""
        return self.engine.structured

    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """(number of KV blocks, tokens per block)."""
        return self.engine.block_manager.pool.num_blocks, self.engine.block_manager.block_size

    @property
    def kv_dtype(self):
        return self.engine.kv_dtype

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        sched = self.engine.scheduler
        waiting = len(sched.waiting)
        return EngineStats(num_running=len(sched.running), num_waiting=waiting,
                           num_queued=waiting + self._pending_adds,
                           kv_cache_usage=self.engine.block_manager.usage,
                           num_preemptions=sched.num_preemptions,
                           prefix_cache_queries=self.engine.block_manager.num_queried_tokens,
                           prefix_cache_hits=self.engine.block_manager.num_hit_tokens,
                           kv_cache_touched=self.engine.block_manager.touched,
                           spec_decode=self.engine.spec.stats if self.engine.spec else None)

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative output after every step that advanced it; the
        last one has ``finished=True``. Raises ValueError / QueueFullError before the
        first yield."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead!r}")
        if not self._accepting:
            raise QueueFullError("the server is shutting down")
        arrival = time.monotonic()
        user = self.engine.make_request(prompt, params, request_id, priority, arrival)
        with self._lock:
            if (self.max_queued_requests is not None
                    and len(self.engine.scheduler.waiting) + self._pending_adds
                    >= self.max_queued_requests):
                raise QueueFullError(f"{self.max_queued_requests} requests are already "
                                     "queued; retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
            stream = Mailbox()
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._pending_adds += 1
            if self.step_sync is not None:
                self._specs[request_id] = (prompt, params, request_id, priority, arrival)
        self._inbox.put(("add", user))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wakeup.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # ---- the engine thread ------------------------------------------------------------
    def _run(self) -> None:
        busy = False
        failures = 0
        try:
            while True:
                running = self._drain_inbox()
                if self.step_sync is not None:
                    applied, self._applied = self._applied, []
                    self.step_sync(applied if running else None)
                if not running:
                    return
                if self.engine.has_unfinished_requests():
                    busy = True
                    try:
                        outputs = self.engine.step()
                    except Exception:
                        # step() ends the requests it can blame itself; this is the rest
                        failures += 1
                        if failures >= MAX_STEP_FAILURES:
                            raise
                        logger.exception("engine step failed (%d in a row)", failures)
                        continue
                    failures = 0
                    self._deliver_step(outputs)
                else:
                    if busy:  # just went idle: a cheap check of every block invariant
                        busy = False
                        self._check_integrity()
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
        except BaseException as e:  # report to every waiting client, then stop
            logger.exception("engine loop crashed")
            self._dead = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine loop crashed: {e!r}"))

    def _check_integrity(self) -> None:
        try:
            self.engine.scheduler.check_integrity()
        except AssertionError:
            logger.exception("KV cache integrity check failed")
            self.integrity_failures += 1

    def _drain_inbox(self) -> bool:
        """Applies queued commands; False when asked to stop."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if cmd is _STOP:
                return False
            kind, arg = cmd
            if kind == "add":
                self._add(arg)
            else:
                try:
                    self.engine.abort_request(arg)
                except Exception:
                    logger.exception("aborting request %s failed", arg)
                if self.step_sync is not None:
                    self._applied.append(("abort", arg))

    def _add(self, user: Request) -> None:
        with self._lock:
            self._pending_adds -= 1
        spec = self._specs.pop(user.request_id, None)
        if user.request_id not in self._streams:  # the client left before we started
            return
        try:
            self.engine.enqueue(user)
            if spec is not None:
                self._applied.append(("add", spec))
        except Exception as e:
            if not isinstance(e, ValueError):
                logger.exception("queueing request %s failed", user.request_id)
                self.engine.abort_request(user.request_id)
            self._deliver(user.request_id, e)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one callback: one wake-up of
        the loop per step instead of one per request (each is a write to its self-pipe,
        and with 32 streams they cost the engine thread ~3% of its time)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], _failure(out) or out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed
                pass

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            pass


def _failure(out: RequestOutput) -> RequestFailedError | None:
    """The error a finished output that failed ends its stream with, or None."""
    if not out.finished:
        return None
    for o in out.outputs:
        if o.finish_reason == "error":
            return RequestFailedError(f"request {out.request_id} failed: {o.stop_reason}", out)
    return None


def _put_all(items: list[tuple[Mailbox, RequestOutput]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
