"""``DataParallelEngine``: N engine replicas behind the ``AsyncEngine`` interface.

The HTTP layer keeps the OpenAI work (templates, tokenization, validation) and calls
``generate(prompt_ids, params, request_id)`` as it would on one engine. Here that becomes:

1. the router (``tokenmill.distributed.routing``; cache-aware by default, on the prompt's
   token ids in chunks of the KV block size) picks a live replica;
2. an *add* message goes to it (``worker``: token ids + ``SamplingParams``); its outputs
   come back through the transport's reader thread and are posted to the event loop into
   the request's ``Mailbox`` (latest cumulative output only, as in ``AsyncEngine``);
3. a consumer that stops early (client disconnect) sends an *abort* to that replica.

Faults. When a replica's process dies (its pipe reports end-of-file) the router forgets
it and each of its requests is settled: a request that has already produced output (a
stream the client is reading) ends with ``RequestFailedError`` (an error frame, or a 500);
one that has produced nothing yet is routed again to a live replica, so the client never
sees the fault. The replica is then restarted in the background (its cores and flags are
kept) and re-admitted to the router when ready; meanwhile the others serve. Only with no
replica alive does a new request fail (``EngineDeadError``).

``stats()`` sums the replicas' latest reports (sent every 0.2 s); ``replica_stats()``
gives them one by one for ``/metrics`` (a ``replica`` label).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.distributed.routing import Router, RouterConfig
from tokenmill.engine.async_engine import (
    EngineDeadError,
    EngineStats,
    Mailbox,
    QueueFullError,
    RequestFailedError,
)
from tokenmill.engine.engine import Engine
from tokenmill.engine.spec_decode import SpecDecodeStats
from tokenmill.engine_args import EngineArgs
from tokenmill.loader.default_model import with_default_model
from tokenmill.outputs import RequestOutput
from tokenmill.replicas.transport import ProcessReplica, split_cores
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.manager import StructuredOutputManager

logger = logging.getLogger("tokenmill")

_REROUTE = object()  # posted to a request whose replica died before it produced output
_DP_FIELDS = ("data_parallel_size", "distributed_executor_backend", "tensor_parallel_size")


@dataclass(eq=False)
class _Pending:
    mailbox: Mailbox
    replica: int = -1
    produced: bool = False


@dataclass
class _Counters:
    restarts: int = 0
    rerouted: int = 0
    failed_on_death: int = 0
    per_replica_routed: dict[int, int] = field(default_factory=dict)


class DataParallelEngine:
    """``AsyncEngine``'s interface over ``n`` replicas (see the module doc)."""

    def __init__(self, config: EngineConfig, replica_flags: dict, n: int,
                 router: RouterConfig, max_queued_requests: int | None = None,
                 backend: str = "mp", tensor_parallel_size: int = 1) -> None:
        self.engine_config = config
        self.max_queued_requests = max_queued_requests
        self.router = Router(router)
        self.counters = _Counters()
        self._flags = replica_flags
        self._backend = backend
        self._tp = tensor_parallel_size
        self._requests: dict[str, _Pending] = {}
        self._stats: dict[int, EngineStats] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.tokenizer = Engine._load_tokenizer(config)
        cores = split_cores(n)  # a tensor-parallel replica splits its share over its ranks
        self.replicas = [self._make_replica(i, cores[i]) for i in range(n)]
        self._start_all()
        info = self.replicas[0].info
        self.model_config = info.model_config
        self.max_model_len = min(r.info.max_model_len for r in self.replicas)
        self.kv_cache_shape = info.kv_cache_shape
        self.kv_dtype = info.kv_dtype
        self.structured_outputs = StructuredOutputManager(self.tokenizer,
                                                          self.model_config.vocab_size)

    @classmethod
    def from_flags(cls, data_parallel_size: int, router: RouterConfig | None = None,
                   max_queued_requests: int | None = None, **engine_flags
                   ) -> DataParallelEngine:
        """Checks the flags, then starts the replicas (in parallel) and returns when every
        one is ready; a replica that cannot start raises here (the others are stopped)."""
        if data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {data_parallel_size}.")
        backend = engine_flags.get("distributed_executor_backend") or "mp"
        args = with_default_model(EngineArgs(**engine_flags)).replace(
            data_parallel_size=1, distributed_executor_backend="mp", tensor_parallel_size=1)
        config = EngineConfig.from_args(args)
        flags = {k: v for k, v in dataclasses.asdict(args).items() if k not in _DP_FIELDS}
        # the tree's chunk is the KV block: a match is what the replica can have cached
        router = dataclasses.replace(router or RouterConfig(), chunk=args.block_size)
        tp = engine_flags.get("tensor_parallel_size") or 1
        if tp > 1 and backend == "ray":
            raise ValueError("--tensor-parallel-size > 1 runs on local processes only (not "
                             "with --distributed-executor-backend ray).")
        return cls(config, flags, data_parallel_size, router, max_queued_requests, backend,
                   tp)

    def _make_replica(self, index: int, cores: list[int]):
        if self._backend == "ray":
            from tokenmill.replicas.ray_actor import RayReplica
            return RayReplica(index, self._flags, cores,
                              self.engine_config.scheduler.max_num_seqs,
                              self._on_message, self._on_exit)
        return ProcessReplica(index, self._flags, cores,
                              self.engine_config.scheduler.max_num_seqs,
                              self._on_message, self._on_exit, self._tp)

    def _start_all(self) -> None:
        errors: list[BaseException] = []

        def start(r) -> None:
            try:
                r.start()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(r,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self._closing = True
            for r in self.replicas:
                r.stop(timeout=5)
            raise errors[0]
        for r in self.replicas:
            self.router.add_tenant(r.index)

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Called on the server's event loop (its lifespan): replica messages go there."""
        self._loop = asyncio.get_running_loop()

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self.replicas))

    @property
    def is_running(self) -> bool:
        return not self._closing and any(r.alive for r in self.replicas)

    def kv_cache_line(self, max_model_len: int, max_num_seqs: int) -> str:
        line = self.replicas[0].info.kv_cache_line
        if self._tp > 1:
            line += f" (each of {self._tp} tensor-parallel ranks holds its heads' share)"
        n = len(self.replicas)
        return line if n == 1 else f"{n} replicas, each: {line}"

    # ---- stats ------------------------------------------------------------------------
    def replica_stats(self) -> list[tuple[int, EngineStats]]:
        return [(r.index, self._stats.get(r.index, _EMPTY)) for r in self.replicas]

    def stats(self) -> EngineStats:
        all_stats = [s for _, s in self.replica_stats()]
        total = {f.name: sum(getattr(s, f.name) for s in all_stats)
                 for f in dataclasses.fields(EngineStats) if f.name != "spec_decode"}
        total["spec_decode"] = _sum_spec_decode([s.spec_decode for s in all_stats])
        n = len(all_stats)
        total["kv_cache_usage"] /= n
        total["kv_cache_touched"] /= n
        total["num_queued"] += sum(1 for p in self._requests.values() if p.replica < 0)
        return EngineStats(**total)

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngine.generate``; the request runs on the replica the router picks
        (and on another one if that replica dies before the request produced output)."""
        if self._closing:
            raise QueueFullError("the server is shutting down")
        if not any(r.alive for r in self.replicas):
            raise EngineDeadError("no engine replica is running")
        if self._tp > 1 and params.structured_outputs is not None:
            # grammars compile in the background on each rank: the ranks could schedule
            # the request at different steps and leave lockstep
            raise ValueError("structured outputs (response_format, tools, guided decoding) "
                             "are not supported with --tensor-parallel-size > 1 yet.")
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use.")
        if (self.max_queued_requests is not None
                and self.stats().num_queued >= self.max_queued_requests):
            raise QueueFullError(f"{self.max_queued_requests} requests are already "
                                 "queued; retry later")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        pending = _Pending(Mailbox())
        self._requests[request_id] = pending
        finished = False
        try:
            self._dispatch(request_id, pending, ids, params, priority)
            while True:
                item = await pending.mailbox.get()
                if item is _REROUTE:
                    self.counters.rerouted += 1
                    self._dispatch(request_id, pending, ids, params, priority)
                    continue
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._requests.pop(request_id, None)
            self.router.finished(pending.replica)
            if not finished and pending.replica >= 0:
                self.replicas[pending.replica].send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        pending = self._requests.get(request_id)
        if pending is not None and pending.replica >= 0:
            self.replicas[pending.replica].send(("abort", request_id))

    def _dispatch(self, rid: str, pending: _Pending, ids: list[int],
                  params: SamplingParams, priority: int) -> None:
        try:
            index = self.router.route(ids)
        except LookupError:
            raise EngineDeadError("no engine replica is running") from None
        pending.replica = index
        self.router.started(index)
        routed = self.counters.per_replica_routed
        routed[index] = routed.get(index, 0) + 1
        self.replicas[index].send(("add", rid, ids, params, priority))

    # ---- messages from the replicas (reader threads) ----------------------------------
    def _post(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed
            pass

    def _on_message(self, index: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "stats":
            self._stats[index] = msg[1]
        elif kind in ("out", "err"):
            self._post(self._deliver, index, msg[1], msg[2])

    def _deliver(self, index: int, rid: str, item) -> None:
        pending = self._requests.get(rid)
        if pending is None or pending.replica != index:
            return
        if isinstance(item, RequestOutput):
            pending.produced = True
            if item.finished:
                failed = next((o for o in item.outputs if o.finish_reason == "error"), None)
                if failed is not None:
                    item = RequestFailedError(f"request {rid} failed: {failed.stop_reason}",
                                              item)
        pending.mailbox.put_nowait(item)

    def _on_exit(self, index: int) -> None:
        self._stats.pop(index, None)
        if self._loop is None:
            self._settle_dead(index)
        else:
            self._post(self._settle_dead, index)

    def _settle_dead(self, index: int) -> None:
        """Runs on the event loop: settle the dead replica's requests, then restart it."""
        self.router.remove_tenant(index)
        for rid, pending in list(self._requests.items()):
            if pending.replica != index:
                continue
            if pending.produced:
                self.counters.failed_on_death += 1
                pending.mailbox.put_nowait(RequestFailedError(
                    f"request {rid} failed: engine replica {index} exited while serving it"))
            else:
                pending.mailbox.put_nowait(_REROUTE)
        if not self._closing:
            threading.Thread(target=self._restart, args=(index,), daemon=True,
                             name=f"tokenmill-replica-{index}-restart").start()

    def _restart(self, index: int) -> None:
        old = self.replicas[index]
        replica = self._make_replica(index, old.cores)
        try:
            replica.start()
        except Exception:
            logger.exception("replica %d could not be restarted", index)
            return
        if self._closing:
            replica.stop()
            return
        self.replicas[index] = replica
        self.counters.restarts += 1
        self._post(self.router.add_tenant, index)
        logger.warning("replica %d restarted (pid %s)", index, replica.pid)


_EMPTY = EngineStats(num_running=0, num_waiting=0, num_queued=0, kv_cache_usage=0.0,
                     num_preemptions=0)


def _sum_spec_decode(parts: list[SpecDecodeStats | None]) -> SpecDecodeStats | None:
    """The replicas' speculative-decoding counters added up (None where none speculates);
    per-position accepted counts are added position by position."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    per_pos = [0] * max(len(p.accepted_per_pos) for p in parts)
    for p in parts:
        for j, count in enumerate(p.accepted_per_pos):
            per_pos[j] += count
    return SpecDecodeStats(num_drafts=sum(p.num_drafts for p in parts),
                           num_draft_tokens=sum(p.num_draft_tokens for p in parts),
                           num_accepted_tokens=sum(p.num_accepted_tokens for p in parts),
                           accepted_per_pos=per_pos)
