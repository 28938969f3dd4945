"""The front end's handle on one replica process, over a ``multiprocessing`` pipe.

``ProcessReplica.start()`` spawns the process (``multiprocessing`` *spawn*: a fresh
interpreter, no fork of a process holding threads and an OpenMP pool), waits for its
``ready`` message and starts a reader thread that hands every message to ``on_message``.
When the pipe reports end-of-file (the process exited or was killed) the reader calls
``on_exit`` once. ``send()`` is safe from any thread and silently drops messages to a
dead replica (its requests are handled by ``on_exit``).

The Ray handle (``ray_actor.RayReplica``) has the same four methods.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable

from tokenmill.replicas.worker import ReplicaInfo, process_main

logger = logging.getLogger("tokenmill")

START_TIMEOUT_S = 600.0


def split_cores(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """Replica i's share of the cores this process may use: contiguous, equal slices
    (the remainder unused); with more replicas than cores, one core each, shared."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if n > len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    k = len(cores) // n
    return [cores[i * k:(i + 1) * k] for i in range(n)]


class ReplicaStartError(ValueError):
    """A replica could not build its engine (the message says why: most often a flag,
    so the CLI prints it as it prints a bad flag)."""


class ProcessReplica:
    def __init__(self, index: int, engine_flags: dict, cores: list[int], max_num_seqs: int,
                 on_message: Callable[[int, tuple], None],
                 on_exit: Callable[[int], None], tensor_parallel_size: int = 1) -> None:
        self.index = index
        self.tensor_parallel_size = tensor_parallel_size
        self.engine_flags = engine_flags
        self.cores = cores
        self.max_num_seqs = max_num_seqs
        self.on_message = on_message
        self.on_exit = on_exit
        self.info: ReplicaInfo | None = None
        self._conn = None
        self._proc = None
        self._lock = threading.Lock()
        self.alive = False

    def start(self) -> ReplicaInfo:
        """Spawns the replica and blocks until its engine is ready (or raises)."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=process_main, name=f"tokenmill-replica-{self.index}",
                           args=(child, self.engine_flags, self.cores, self.max_num_seqs,
                                 self.tensor_parallel_size),
                           # a daemon may not start processes: rank 0 starts its followers
                           daemon=self.tensor_parallel_size == 1)
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            proc.kill()
            raise ReplicaStartError(f"replica {self.index} did not start in "
                                    f"{START_TIMEOUT_S:g} s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise ReplicaStartError(f"replica {self.index} exited while starting (exit "
                                    f"code {proc.exitcode})") from None
        if kind != "ready":
            proc.join(5)
            raise ReplicaStartError(f"replica {self.index} failed to start: {payload}")
        self._conn, self._proc, self.info, self.alive = parent, proc, payload, True
        logger.info("replica %d ready (pid %d, cores %s)", self.index, proc.pid, self.cores)
        threading.Thread(target=self._read, name=f"tokenmill-replica-{self.index}-reader",
                         daemon=True).start()
        return payload

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self.on_message(self.index, msg)
        self.alive = False
        self._proc.join(5)
        logger.warning("replica %d (pid %d) exited with code %s", self.index,
                       self._proc.pid, self._proc.exitcode)
        self.on_exit(self.index)

    def send(self, msg: tuple) -> None:
        if not self.alive:
            return
        with self._lock:
            try:
                self._conn.send(msg)
            except (BrokenPipeError, OSError):
                pass  # it died: the reader reports it

    def stop(self, timeout: float = 10.0) -> None:
        """Asks the replica to stop, then waits (killing it after ``timeout`` s)."""
        self.send(("stop",))
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
