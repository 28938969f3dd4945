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
float32 weight (its ``torch.empty`` pages are never touched). If the parts of a fused
layer disagree in type, the layer falls back to a dense float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import all_reduce, tp_rank, tp_size
from tokenmill.layers.quantization import PackedWeight, QuantizedTensor, packable, packed_linear


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
        self.packed: PackedWeight | None = None
        self._dense = False  # some rows of self.weight were written as floats

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def _store(self, param: nn.Parameter, row_offset: int,
               part: torch.Tensor | QuantizedTensor) -> None:
        """Copy ``part`` (this rank's slice) into rows ``[row_offset, +len)`` of ``param``,
        keeping quantized blocks packed where a kernel can read them."""
        if param is self.weight and isinstance(part, QuantizedTensor):
            if self.packed is None and not self._dense and packable(part.qtype):
                self.packed = PackedWeight(part.qtype, *param.shape)
            if self.packed is not None and self.packed.qtype == part.qtype:
                self.packed.copy_rows(row_offset, part)
                return
        if param is self.weight:
            self._densify()
        if isinstance(part, QuantizedTensor):
            part = part.dequantize()
        param.data.narrow(0, row_offset, part.shape[0]).copy_(part)

    def _densify(self) -> None:
        """Use the float weight from now on (a part arrived dense or in another type)."""
        self._dense = True
        if self.packed is not None:
            self.weight.data.copy_(self.packed.dequantize())
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        y = packed_linear(x, self.packed) if self.packed is not None else F.linear(x, self.weight)
        y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
