"""Linear layers written tensor-parallel from the start (Megatron style).

A column-parallel layer splits its output features across ranks (each rank computes a
slice of the output); a row-parallel layer splits its input features (each rank computes
a partial sum, then an all-reduce adds them). Attention's q/k/v and the MLP's gate/up
are column-parallel, o_proj and down_proj row-parallel, so one all-reduce per block
suffices. With one rank all of this reduces to ``F.linear``.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that takes the full
checkpoint tensor and copies in this rank's slice, so the model's loader never needs to
know about sharding. Fused layers (qkv, gate_up) take their parts by ``shard_id``.

A GGUF part may arrive still quantized (``QuantizedTensor``); the layer then keeps the
blocks (``self.packed``) and multiplies with ``packed_linear``, never materialising the
float32 weight (its ``torch.empty`` pages are never touched). The parts of a fused layer
are held until all its rows have arrived, then packed together (``pack_parts``: one
buffer, or row ranges of their own types, used in place where the type is read as
stored). If a part arrives as floats, the layer falls back to a dense float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import all_reduce, tp_rank, tp_size
from tokenmill.layers.quantization import (
    PackedRows,
    PackedWeight,
    QuantizedTensor,
    pack_parts,
    packable,
    packed_linear,
)


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
        self.packed: PackedWeight | PackedRows | None = None
        self._parts: list[tuple[int, QuantizedTensor]] = []  # until every row has arrived
        self._dense = False  # some rows of self.weight were written as floats

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def _store(self, param: nn.Parameter, row_offset: int,
               part: torch.Tensor | QuantizedTensor) -> None:
        """Copy ``part`` (this rank's slice) into rows ``[row_offset, +len)`` of ``param``,
        keeping quantized blocks packed where a kernel can read them."""
        if (param is self.weight and isinstance(part, QuantizedTensor) and not self._dense
                and self.packed is None and packable(part.qtype)):
            self._parts.append((row_offset, part))
            arrived = sum(p.shape[0] for _, p in self._parts)
            if arrived > param.shape[0]:
                raise RuntimeError(f"more rows than the {tuple(param.shape)} weight holds "
                                   "arrived (a part loaded twice?)")
            if arrived == param.shape[0]:
                packed = pack_parts(self._parts, tuple(param.shape))
                if packed is None:  # more parts than the kernels take in one matrix
                    self._densify()
                else:
                    self.packed, self._parts = packed, []
            return
        if param is self.weight:
            self._densify()
        if isinstance(part, QuantizedTensor):
            part = part.dequantize()
        param.data.narrow(0, row_offset, part.shape[0]).copy_(part)

    def _densify(self) -> None:
        """Use the float weight from now on (a part arrived dense or in another type)."""
        self._dense = True
        for offset, part in self._parts:
            self.weight.data.narrow(0, offset, part.shape[0]).copy_(part.dequantize())
        self._parts = []
        if self.packed is not None:
            self.weight.data.copy_(self.packed.dequantize())
            self.packed = None

    def _check_loaded(self) -> None:
        if self._parts:
            raise RuntimeError(f"weight {tuple(self.weight.shape)} used before all its rows "
                               "arrived")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param, loaded, shard_id=None):
        self._store(param, 0, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps rows ``[rank*n, (rank+1)*n)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, _shard_size(out_features), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        self._store(param, 0, loaded.narrow(0, tp_rank() * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers fused into one GEMM (e.g. gate_proj and up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        sizes = [s // tp_size() for s in self.out_sizes]
        offset, n = sum(sizes[:shard_id]), sizes[shard_id]
        self._store(param, offset, loaded.narrow(0, tp_rank() * n, n))


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
        self._store(param, offset, loaded.narrow(0, rank * n, n))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed by all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(_shard_size(in_features), out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        n = param.shape[1]
        self._store(param, 0, loaded.narrow(1, tp_rank() * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        y = packed_linear(x, self.packed) if self.packed is not None else F.linear(x, self.weight)
        y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
