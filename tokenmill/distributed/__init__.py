"""Tensor-parallel group state. World size 1 today; the layers already shard by rank, so
tensor parallelism over torch.distributed (gloo on CPU, NCCL on GPU) becomes a flag."""

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
