"""Tensor-parallel group state: the rank and size of the default torch.distributed group
(1 when none is initialized). The layers shard by it (column-parallel: their rank's heads
and MLP columns; row-parallel: all-reduce of the partial sums) and ``per_rank_heads`` sizes
the KV cache to match, so a process that joins a group (gloo on CPU, NCCL on GPU) before
building its engine runs its shard; ranks that run the same requests in the same order
step in lockstep (``tests/distributed/test_tensor_parallel.py``). Serving with a
tensor-parallel flag (one scheduler, its step broadcast to the ranks) is not built."""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums partial results of a row-parallel layer across ranks (no-op on one rank)."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def per_rank_heads(config):
    """``config`` (a frozen dataclass with ``num_heads`` / ``num_kv_heads``) with the head
    counts one rank holds: what the engine sizes its KV cache by. KV heads fewer than the
    ranks are replicated (one per rank), as ``QKVParallelLinear`` shards them."""
    tp = tp_size()
    if tp == 1:
        return config
    import dataclasses

    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=max(1, config.num_kv_heads // tp))
