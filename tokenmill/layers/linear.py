"""Linear layers written tensor-parallel from the start (Megatron style).

A column-parallel layer splits its output features across ranks (each rank computes a
slice of the output); a row-parallel layer splits its input features (each rank computes
a partial sum, then an all-reduce adds them). Attention's q/k/v and the MLP's gate/up
are column-parallel, o_proj and down_proj row-parallel, so one all-reduce per block
suffices. With one rank all of this reduces to ``F.linear``.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that takes the full
checkpoint tensor and copies in this rank's slice, so the model's loader never needs to
know about sharding. Fused layers (qkv, gate_up) take their parts by ``shard_id``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import all_reduce, tp_rank, tp_size


def _shard_size(total: int) -> int:
    if total % tp_size():
        raise ValueError(f"dimension {total} does not divide across {tp_size()} ranks")
    return total // tp_size()


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param, loaded, shard_id=None):
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps rows ``[rank*n, (rank+1)*n)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, _shard_size(out_features), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, tp_rank() * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers fused into one GEMM (e.g. gate_proj and up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        sizes = [s // tp_size() for s in self.out_sizes]
        offset, n = sum(sizes[:shard_id]), sizes[shard_id]
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, tp_rank() * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks (KV heads replicated when
    there are fewer of them than ranks)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = _shard_size(num_heads)
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden, out, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, n = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        rank = tp_rank() if shard_id == "q" else tp_rank() // self.kv_replicas
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, rank * n, n))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed by all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(_shard_size(in_features), out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, tp_rank() * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
