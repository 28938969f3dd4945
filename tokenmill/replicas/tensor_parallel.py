"""``--tensor-parallel-size N``: one replica's model sharded over N processes.

The replica process is rank 0: it spawns ranks 1..N-1 (*followers*), all join a gloo group
(``torch.distributed``; TCP on the loopback), and each builds its engine, whose layers
load their rank's heads and MLP columns (``tokenmill.distributed``). Rank 0 runs the
``AsyncEngine`` as any replica does; its engine thread calls ``broadcast_commands`` before
every loop turn with the adds and aborts it just applied (``AsyncEngine.step_sync``), so
every follower applies the same commands and steps when rank 0 steps. The scheduler's
decisions depend only on those commands, so the ranks stay in lockstep; the model's
row-parallel layers all-reduce their partial sums, which gloo leaves bitwise equal on
every rank, so every rank samples the same tokens. Only rank 0's outputs are used.

Limits: requests with structured outputs are refused (a grammar compiles in the
background on each rank, so the ranks could schedule it at different steps); a failure
that rank 0's engine pins on one request (its data broke a step) is not mirrored to the
followers, so the ranks part ways, the next collective fails or times out, and the group
restarts.

A rank that dies breaks the next collective on the others (gloo reports the closed
connection; ``TIMEOUT_S`` bounds a silent one): rank 0's engine loop stops with that
error, the replica exits (``worker.ReplicaServer``) and the front end restarts the whole
group. Followers exit when rank 0 goes away for the same reason, or on its stop message.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket

from tokenmill.replicas.worker import pin_threads

TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def start_group(world: int, shares: list[list[int]], engine_flags: dict) -> list:
    """Called by rank 0 before it builds its engine: spawns the followers and joins the
    group with them; returns the follower processes."""
    ctx = mp.get_context("spawn")
    port = free_port()
    followers = [ctx.Process(target=follower_main, name=f"tokenmill-tp-rank-{rank}",
                             args=(rank, world, port, engine_flags, shares[rank]),
                             daemon=True)
                 for rank in range(1, world)]
    for p in followers:
        p.start()
    join_group(0, world, port)
    return followers


def broadcast_commands(commands: list | None) -> None:
    """Rank 0's side of one loop turn (None: stop)."""
    import torch.distributed as dist

    dist.broadcast_object_list([commands], src=0)


def follower_main(rank: int, world: int, port: int, engine_flags: dict,
                  cores: list[int]) -> None:
    pin_threads(cores)
    join_group(rank, world, port)
    import torch.distributed as dist

    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine import Engine
    from tokenmill.engine_args import EngineArgs

    engine = Engine(EngineConfig.from_args(EngineArgs(**engine_flags)), False)
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        commands = box[0]
        if commands is None:
            break
        for kind, arg in commands:
            if kind == "add":
                engine.enqueue(engine.make_request(*arg))
            else:
                engine.abort_request(arg)
        if engine.has_unfinished_requests():
            engine.step()
    dist.destroy_process_group()
