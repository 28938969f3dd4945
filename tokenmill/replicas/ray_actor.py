"""``--distributed-executor-backend ray``: each replica is a Ray actor on the Ray cluster
this process joins (``ray.init(address="auto")`` unless the caller already did: a cluster
started with ``ray start --head`` / ``ray start --address=...``).

The actor (an async actor: its methods run on one event loop) holds an ``AsyncEngine`` and
a ``worker.ReplicaServer``; ``submit(msg)`` applies a front-end message and ``poll()``
returns the replica's answers queued since the last poll (waiting up to 0.5 s for one).
``RayReplica`` is the front end's handle, with ``ProcessReplica``'s interface: ``send``
submits without waiting; a reader thread polls and hands messages on; when the actor dies
(``RayActorError``: its node or process went away) the reader reports the exit.

Placement: each actor asks Ray for as many CPUs as it runs threads (the front end's cores
divided by the replicas), so Ray spreads replicas over nodes with free CPUs. Every node
must see the model at the same path (the embedded default model is in the package).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from tokenmill.replicas.worker import ReplicaInfo, ReplicaServer, pin_threads, replica_info

logger = logging.getLogger("tokenmill")

POLL_WAIT_S = 0.5
_INIT_LOCK = threading.Lock()  # the replicas start in parallel threads


class ReplicaActor:
    """The body of the Ray actor (wrapped with ``ray.remote`` at start-up)."""

    def __init__(self, engine_flags: dict, threads: int, max_num_seqs: int) -> None:
        pin_threads(threads=threads)  # Ray decides the node; no core binding here
        from tokenmill.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine.from_flags(show_progress=False, **engine_flags)
        self.max_num_seqs = max_num_seqs
        self.server: ReplicaServer | None = None
        self.outbox: asyncio.Queue | None = None

    async def ready(self) -> tuple[ReplicaInfo, str]:
        import ray

        self.outbox = asyncio.Queue()
        self.server = ReplicaServer(self.engine, self.outbox.put_nowait)
        asyncio.get_running_loop().create_task(self.server.run())
        return (replica_info(self.engine, self.max_num_seqs),
                ray.get_runtime_context().get_node_id())

    async def submit(self, msg: tuple) -> None:
        self.server.handle(msg)

    async def poll(self) -> list[tuple]:
        items = []
        try:
            items.append(await asyncio.wait_for(self.outbox.get(), POLL_WAIT_S))
        except TimeoutError:
            return items
        while not self.outbox.empty():
            items.append(self.outbox.get_nowait())
        return items


class RayReplica:
    """The front end's handle on one replica actor (``ProcessReplica``'s interface)."""

    def __init__(self, index: int, engine_flags: dict, cores: list[int], max_num_seqs: int,
                 on_message: Callable[[int, tuple], None],
                 on_exit: Callable[[int], None]) -> None:
        self.index = index
        self.engine_flags = engine_flags
        self.cores = cores
        self.max_num_seqs = max_num_seqs
        self.on_message = on_message
        self.on_exit = on_exit
        self.info: ReplicaInfo | None = None
        self.node_id: str | None = None
        self.actor = None
        self.alive = False

    def start(self) -> ReplicaInfo:
        try:
            import ray
        except ImportError as e:
            raise ImportError("--distributed-executor-backend ray needs Ray: pip install "
                              "'tokenmill[ray]'") from e
        with _INIT_LOCK:
            if not ray.is_initialized():
                ray.init(address="auto", log_to_driver=False)
        threads = max(1, len(self.cores))
        cls = ray.remote(num_cpus=threads, max_concurrency=1000)(ReplicaActor)
        self.actor = cls.remote(self.engine_flags, threads, self.max_num_seqs)
        self.info, self.node_id = ray.get(self.actor.ready.remote())
        self.alive = True
        logger.info("replica %d ready (Ray actor on node %s, pid %d)", self.index,
                    self.node_id, self.info.pid)
        threading.Thread(target=self._read, name=f"tokenmill-replica-{self.index}-reader",
                         daemon=True).start()
        return self.info

    @property
    def pid(self) -> int | None:
        return self.info.pid if self.info is not None else None

    def _read(self) -> None:
        import ray

        while True:
            try:
                msgs = ray.get(self.actor.poll.remote())
            except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
                break
            for msg in msgs:
                self.on_message(self.index, msg)
        self.alive = False
        logger.warning("replica %d (Ray actor) is gone", self.index)
        self.on_exit(self.index)

    def send(self, msg: tuple) -> None:
        if self.alive:
            self.actor.submit.remote(msg)

    def stop(self, timeout: float = 10.0) -> None:
        import ray

        if self.actor is None:
            return
        self.send(("stop",))
        self.alive = False
        try:
            ray.get(self.actor.poll.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - it is being killed anyway
            pass
        ray.kill(self.actor)
