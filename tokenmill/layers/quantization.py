"""Weights kept in llama.cpp's block formats, multiplied without unpacking them in memory.

A GGUF checkpoint stores most matrices as Q4_0, Q4_1 or Q8_0 blocks of 32 weights
(0.56-1.06 bytes per weight instead of 4 for float32). ``QuantizedTensor`` carries such a
matrix from the loader to the layers unchanged; ``PackedWeight`` is what a linear layer
or the embedding holds after loading; ``packed_linear`` multiplies by it:

the C kernel ``tm_gemm`` reads the compressed bytes once per 4 rows of activations. A CPU
decode step is bound by how many weight bytes it reads, so this is the main speed-up of
the CPU path; for prefill chunks (hundreds of rows) it keeps up with decoding the matrix
to float32 and calling BLAS (``python benchmarks/packed_linear.py``), so it is used for
every row count.

Numerics (llama.cpp's): the weights are used exactly as stored, the activations are
rounded to 8 bits per block of 32 (one float scale per block), so each block's product
is an exact integer dot product. Each output row is summed in the same order whatever
the number of rows, so a sequence's numbers, hence its greedy tokens, do not depend on
what else is in the batch (BLAS on decoded weights would sum large batches in another
order). ``--quantization none`` dequantizes at load and runs float32 instead (the
path that matches transformers to float rounding).
"""

from __future__ import annotations

import torch

from tokenmill.gguf.quant_types import (
    BLOCK,
    PACKED_BLOCK_BYTES,
    QTYPE_NAMES,
    QuantizedTensor,
)
from tokenmill.kernels.cpu import kernels

__all__ = ["BLOCK", "PACKED_BLOCK_BYTES", "QTYPE_NAMES", "PackedWeight", "QuantizedTensor",
           "packable", "packed_linear", "regroup_rows", "ungroup_rows"]

def packable(qtype: int) -> bool:
    """Can a tensor of this ggml type stay packed (a kernel reads it, and it was built)?"""
    return qtype in PACKED_BLOCK_BYTES and kernels() is not None


def regroup_rows(qtype: int, data: torch.Tensor) -> torch.Tensor:
    """GGUF rows of blocks ``[rows, nb * block_bytes]`` -> the kernels' row layout:
    ``[integers of all blocks | d of all blocks | m of all blocks (Q4_1)]``, same size.
    Grouping the fp16 scales lets the kernel convert 8 of them with one instruction."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, PACKED_BLOCK_BYTES[qtype])
    ints_at = 4 if qtype == 3 else 2
    parts = [blocks[..., ints_at:], blocks[..., 0:2]]
    if qtype == 3:
        parts.append(blocks[..., 2:4])
    return torch.cat([p.reshape(rows, -1) for p in parts], dim=1)


def ungroup_rows(qtype: int, data: torch.Tensor) -> torch.Tensor:
    """The inverse of ``regroup_rows``: the kernels' row layout -> GGUF rows of blocks."""
    rows, nb = data.shape[0], data.shape[1] // PACKED_BLOCK_BYTES[qtype]
    ib = 32 if qtype == 8 else 16
    ints = data[:, :nb * ib].reshape(rows, nb, ib)
    scales = data[:, nb * ib:].reshape(rows, -1, nb, 2).transpose(1, 2).reshape(rows, nb, -1)
    return torch.cat([scales, ints], dim=2).reshape(rows, -1)


class PackedWeight:
    """An [out_features, in_features] matrix held as quantized blocks, filled row range by
    row range as the checkpoint's (possibly fused) parts arrive, in the row layout of
    ``regroup_rows``. When the last row has arrived it is put, in place, in the layout the
    kernels read (``CPUKernels.pack_layout``: 16 rows interleaved where the CPU has AVX-512
    VNNI); it cannot be used before that."""

    def __init__(self, qtype: int, rows: int, cols: int) -> None:
        self.qtype = qtype
        self.shape = (rows, cols)
        self.data = torch.empty(rows, cols // BLOCK * PACKED_BLOCK_BYTES[qtype],
                                dtype=torch.uint8)
        self._missing = torch.ones(rows, dtype=torch.bool)  # rows not copied yet

    @property
    def complete(self) -> bool:
        return self._missing is None

    def copy_rows(self, offset: int, part: QuantizedTensor) -> None:
        if self._missing is None:
            raise RuntimeError("every row of this packed matrix was already copied")
        self.data.narrow(0, offset, part.shape[0]).copy_(regroup_rows(self.qtype, part.data))
        self._missing[offset:offset + part.shape[0]] = False
        if not self._missing.any():
            kernels().pack_layout(self.qtype, self.data, *self.shape)
            self._missing = None

    def _ready(self) -> torch.Tensor:
        if self._missing is not None:
            raise RuntimeError(f"packed matrix {self.shape} used before all its rows arrived")
        return self.data

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix as float32 (rows not copied yet hold garbage)."""
        if self._missing is not None:  # still in the row layout
            dense = QuantizedTensor(self.qtype, ungroup_rows(self.qtype, self.data),
                                    self.shape).dequantize()
            return dense if out is None else out.copy_(dense)
        return kernels().dequant(self.qtype, self.data, *self.shape, out=out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``ids`` (an embedding lookup)."""
        out = kernels().dequant_rows(self.qtype, self._ready(), *self.shape, ids)
        return out.view(*ids.shape, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def packed_linear(x: torch.Tensor, weight: PackedWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x of shape [..., in_features]; float32 math, x's dtype out."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = kernels().gemm(weight.qtype, x2, weight._ready(), n)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], n)
