"""Inside a replica: one ``AsyncEngine`` served over a stream of messages.

The front end sends plain tuples (pickled by the transport):

    ("add", request_id, prompt_token_ids, SamplingParams, priority)
    ("abort", request_id)
    ("stop",)

and the replica answers with

    ("ready", ReplicaInfo)                       once, when its engine is built
    ("out", request_id, RequestOutput)           after every step that advanced it
    ("err", request_id, exception)               the request failed or was refused
    ("stats", EngineStats)                       every ``STATS_INTERVAL_S``

``ReplicaServer`` is the transport-free part: ``handle()`` applies a message on the
replica's event loop (an *add* becomes a task iterating ``AsyncEngine.generate``, an
*abort* cancels that task, which aborts the engine request and frees its blocks) and
``emit`` is how answers leave. ``process_main`` is the entry point of a spawned replica
process: it pins itself to its cores, sets its torch threads, builds the engine, and
serves a ``multiprocessing`` connection; the front end closing the connection stops it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("tokenmill")

STATS_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ReplicaInfo:
    """What the front end needs to know of a replica's engine (fixed once built)."""

    pid: int
    max_model_len: int
    model_config: Any
    kv_cache_line: str
    kv_cache_shape: tuple[int, int]
    kv_dtype: Any
    follower_pids: tuple[int, ...] = ()  # tensor-parallel ranks 1..N-1


def replica_info(engine, max_num_seqs: int) -> ReplicaInfo:
    return ReplicaInfo(pid=os.getpid(), max_model_len=engine.max_model_len,
                       model_config=engine.model_config,
                       kv_cache_line=engine.engine.runner.kv_cache_line(engine.max_model_len,
                                                                        max_num_seqs),
                       kv_cache_shape=engine.kv_cache_shape, kv_dtype=engine.kv_dtype)


class ReplicaServer:
    """Applies the front end's messages to ``engine`` on the running event loop."""

    def __init__(self, engine, emit: Callable[[tuple], None]) -> None:
        self.engine = engine
        self.emit = emit
        self.tasks: dict[str, asyncio.Task] = {}
        self.stopping = asyncio.Event()
        self._early_aborts: collections.deque[str] = collections.deque(maxlen=1024)

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, ids, params, priority = msg
            if rid in self._early_aborts:
                self._early_aborts.remove(rid)
                return
            self.tasks[rid] = asyncio.get_running_loop().create_task(
                self._serve(rid, ids, params, priority))
        elif kind == "abort":
            task = self.tasks.pop(msg[1], None)
            if task is not None:
                task.cancel()
            else:  # a transport that may reorder (Ray) can bring it before its add
                self._early_aborts.append(msg[1])
        elif kind == "stop":
            self.stopping.set()

    async def _serve(self, rid: str, ids: list[int], params, priority: int) -> None:
        from tokenmill.engine.async_engine import RequestFailedError

        try:
            async for out in self.engine.generate(ids, params, rid, priority):
                self.emit(("out", rid, out))
        except asyncio.CancelledError:
            pass  # aborted by the front end: generate() has aborted the engine request
        except RequestFailedError as e:
            # the failed output itself (its reason), not the exception: exceptions cross
            # the pipe with their message only
            self.emit(("out", rid, e.output) if e.output is not None else ("err", rid, e))
        except Exception as e:
            self.emit(("err", rid, e))
        finally:
            self.tasks.pop(rid, None)

    async def run(self) -> None:
        """Reports stats until asked to stop, then shuts the engine down. An engine loop
        that died ends this too: the replica exits and the front end restarts it."""
        self.engine.start()
        while not self.stopping.is_set():
            if not self.engine.is_running:
                logger.error("replica %d: the engine loop has stopped; exiting", os.getpid())
                break
            self.emit(("stats", self.engine.stats()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), STATS_INTERVAL_S)
        for task in list(self.tasks.values()):
            task.cancel()
        await self.engine.shutdown(timeout=0)


def pin_threads(cores: list[int] = (), threads: int | None = None) -> None:
    """Binds this process to ``cores`` and gives torch (and OpenMP) ``threads`` threads
    (default: one per core). Runs before torch is imported: OpenMP reads
    ``OMP_NUM_THREADS`` when it loads, and that is the count the engine thread's C kernels
    use (``omp_set_num_threads`` from this thread would not reach it). This module
    therefore imports nothing heavy at its top."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    threads = str(threads or max(1, len(cores)))
    os.environ["OMP_NUM_THREADS"] = threads
    import torch
    torch.set_num_threads(int(threads))


def process_main(conn, engine_flags: dict, cores: list[int], max_num_seqs: int,
                 tensor_parallel_size: int = 1) -> None:
    """A spawned replica process: build the engine (as rank 0 of a tensor-parallel group
    when ``tensor_parallel_size`` > 1), then serve ``conn`` until it closes."""
    from tokenmill.replicas.transport import split_cores

    shares = split_cores(tensor_parallel_size, cores or None)
    pin_threads(shares[0])
    followers = []
    try:
        if tensor_parallel_size > 1:
            from tokenmill.replicas.tensor_parallel import start_group
            followers = start_group(tensor_parallel_size, shares, engine_flags)
        from tokenmill.engine.async_engine import AsyncEngine
        engine = AsyncEngine.from_flags(show_progress=False, **engine_flags)
    except BaseException as e:  # noqa: BLE001 - reported to the front end, then exit
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    if followers:
        from tokenmill.replicas.tensor_parallel import broadcast_commands
        engine.step_sync = broadcast_commands
    info = dataclasses.replace(replica_info(engine, max_num_seqs),
                               follower_pids=tuple(p.pid for p in followers))
    conn.send(("ready", info))
    asyncio.run(_serve_connection(engine, conn))


async def _serve_connection(engine, conn) -> None:
    loop = asyncio.get_running_loop()
    server = ReplicaServer(engine, conn.send)  # sends happen on this loop's thread only

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the front end is gone
                msg = ("stop",)
            loop.call_soon_threadsafe(server.handle, msg)
            if msg[0] == "stop":
                return

    threading.Thread(target=read, name="tokenmill-replica-inbox", daemon=True).start()
    try:
        await server.run()
    except (BrokenPipeError, EOFError, OSError):
        logger.info("front end gone; replica %d stops", os.getpid())
