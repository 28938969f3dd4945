"""Weights kept in llama.cpp's block formats, multiplied without unpacking them in memory.

A GGUF checkpoint stores most matrices in blocks of 32 weights (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, IQ4_NL) or super-blocks of 256 (the K-quants Q2_K..Q6_K, IQ4_XS): 0.33-1.06 bytes
per weight instead of 4 for float32. ``QuantizedTensor`` carries such a matrix from the
loader to the layers unchanged; ``PackedWeight`` (one type) or ``PackedRows`` (row ranges
of several, e.g. a fused q/k/v whose parts the file stores in different types) is what a
linear layer or the embedding holds after loading; ``packed_linear`` multiplies by it:

the C kernels (``tm_gemm_weight``) read the compressed bytes once per 4 rows of
activations. A CPU decode step is bound by how many weight bytes it reads, so this is the
main speed-up of the CPU path; for prefill chunks (hundreds of rows) it keeps up with
decoding the matrix to float32 and calling BLAS (``python benchmarks/packed_linear.py``),
so it is used for every row count.

Layouts: Q4_0, Q4_1 and Q8_0 are copied at load into a regrouped row layout
(``regroup_rows``: the row's integers, then its scales, so the kernel converts 8 scales
with one instruction; interleaved by 16 rows where the CPU has VNNI): a copy of those
matrices, in the time of one pass over their bytes. Every other type is read as the file
stores it, so its matrices are views of the memory-mapped file (``PackedWeight.of``): no
copy, and pages shared with the page cache.

Numerics (llama.cpp's): the weights are used exactly as stored, the activations are
rounded to 8 bits per block of 32 (one float scale per block, whatever the weight type),
so each (sub-)block's product is an exact integer dot product. Each output row is summed
in the same order whatever the number of rows, so a sequence's numbers, hence its greedy
tokens, do not depend on what else is in the batch (BLAS on decoded weights would sum
large batches in another order). ``--quantization none`` dequantizes at load and runs
float32 instead (the path that matches transformers to float rounding).
"""

from __future__ import annotations

import torch

from tokenmill.gguf.quant_types import (
    BLOCK_WEIGHTS,
    PACKED_BLOCK_BYTES,
    QTYPE_NAMES,
    QuantizedTensor,
    row_bytes,
)
from tokenmill.kernels.cpu import MAX_SEGMENTS, TmWeight, kernels

__all__ = ["BLOCK_WEIGHTS", "PACKED_BLOCK_BYTES", "QTYPE_NAMES", "REGROUPED", "PackedRows",
           "PackedWeight", "QuantizedTensor", "pack_parts", "packable", "packed_linear",
           "regroup_rows", "ungroup_rows"]

# Types whose kernels read the regrouped row layout (a copy at load); the others are read
# as stored.
REGROUPED = frozenset({2, 3, 8})  # Q4_0, Q4_1, Q8_0


def packable(qtype: int) -> bool:
    """Can a tensor of this ggml type stay packed (a kernel reads it, and it was built)?"""
    return qtype in PACKED_BLOCK_BYTES and kernels() is not None


def regroup_rows(qtype: int, data: torch.Tensor) -> torch.Tensor:
    """GGUF rows of blocks ``[rows, nb * block_bytes]`` -> the kernels' row layout. For
    Q4_0, Q4_1, Q8_0: ``[integers of all blocks | d of all blocks | m of all blocks
    (Q4_1)]``, same size (grouping the fp16 scales lets the kernel convert 8 of them with
    one instruction); the other types are read as stored (``data`` itself)."""
    if qtype not in REGROUPED:
        return data
    out = torch.empty(data.shape, dtype=torch.uint8)
    _regroup_into(qtype, data, out)
    return out


def _regroup_into(qtype: int, data: torch.Tensor, out: torch.Tensor) -> None:
    """``regroup_rows`` written into ``out`` (rows of the same shape), with no temporaries."""
    rows, bb = data.shape[0], PACKED_BLOCK_BYTES[qtype]
    blocks = data.reshape(rows, -1, bb)
    nb = blocks.shape[1]
    ints_at = 4 if qtype == 3 else 2
    ib = bb - ints_at
    out[:, :nb * ib].view(rows, nb, ib).copy_(blocks[..., ints_at:])
    out[:, nb * ib:nb * (ib + 2)].view(rows, nb, 2).copy_(blocks[..., 0:2])
    if qtype == 3:
        out[:, nb * (ib + 2):].view(rows, nb, 2).copy_(blocks[..., 2:4])


def ungroup_rows(qtype: int, data: torch.Tensor) -> torch.Tensor:
    """The inverse of ``regroup_rows``: the kernels' row layout -> GGUF rows of blocks."""
    if qtype not in REGROUPED:
        return data
    rows, nb = data.shape[0], data.shape[1] // PACKED_BLOCK_BYTES[qtype]
    ib = 32 if qtype == 8 else 16
    ints = data[:, :nb * ib].reshape(rows, nb, ib)
    scales = data[:, nb * ib:].reshape(rows, -1, nb, 2).transpose(1, 2).reshape(rows, nb, -1)
    return torch.cat([scales, ints], dim=2).reshape(rows, -1)


class PackedWeight:
    """An [out_features, in_features] matrix of one type held as quantized blocks in the
    layout the kernels read.

    ``PackedWeight.of(t)`` takes a whole matrix: for the types read as stored, ``t``'s
    bytes themselves (no copy). ``PackedWeight(qtype, rows, cols)`` allocates one to be
    filled row range by row range (``copy_rows``, in the row layout of ``regroup_rows``);
    when the last row has arrived it is put, in place, in the layout the kernels read
    (``CPUKernels.pack_layout``: 16 rows interleaved where the CPU has VNNI, for Q4_0,
    Q4_1, Q8_0); it cannot be used before that."""

    def __init__(self, qtype: int, rows: int, cols: int) -> None:
        self.qtype = qtype
        self.shape = (rows, cols)
        self.data = torch.empty(rows, row_bytes(qtype, cols), dtype=torch.uint8)
        self._missing = torch.ones(rows, dtype=torch.bool)  # rows not copied yet
        self._tm: TmWeight | None = None

    @classmethod
    def of(cls, t: QuantizedTensor) -> PackedWeight:
        """The whole matrix ``t``: its bytes as they are (a view, e.g. of a memory-mapped
        file) where the kernels read the type as stored, else a regrouped copy."""
        if t.qtype in REGROUPED or not t.data.is_contiguous():
            w = cls(t.qtype, *t.shape)
            w.copy_rows(0, t)
            return w
        if tuple(t.data.shape) != (t.shape[0], row_bytes(t.qtype, t.shape[1])):
            raise ValueError(f"{QTYPE_NAMES[t.qtype]} blocks {tuple(t.data.shape)} do not "
                             f"hold a {t.shape} matrix")
        w = cls.__new__(cls)
        w.qtype, w.shape, w.data = t.qtype, tuple(t.shape), t.data
        w._missing, w._tm = None, None
        return w

    @property
    def complete(self) -> bool:
        return self._missing is None

    def copy_rows(self, offset: int, part: QuantizedTensor) -> None:
        if self._missing is None:
            raise RuntimeError("every row of this packed matrix was already copied")
        dst = self.data.narrow(0, offset, part.shape[0])
        if self.qtype in REGROUPED:
            _regroup_into(self.qtype, part.data, dst)
        else:
            dst.copy_(part.data)
        self._missing[offset:offset + part.shape[0]] = False
        if not self._missing.any():
            kernels().pack_layout(self.qtype, self.data, *self.shape)
            self._missing = None

    def _ready(self) -> torch.Tensor:
        if self._missing is not None:
            raise RuntimeError(f"packed matrix {self.shape} used before all its rows arrived")
        return self.data

    def tm_weight(self) -> TmWeight:
        """The matrix as the C kernels take it (one segment)."""
        if self._tm is None:
            self._tm = TmWeight.of([(self.qtype, self._ready(), self.shape[0])])
        return self._tm

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


class PackedRows:
    """A matrix stacked from row ranges that are packed matrices of their own (at most
    ``MAX_SEGMENTS``): a fused projection (q/k/v, gate/up) whose parts a GGUF file
    stores in different types, or in a type read as stored, each part then used in place.
    The kernels multiply all parts in one call, rounding the activations once."""

    def __init__(self, parts: list[PackedWeight]) -> None:
        if not 1 <= len(parts) <= MAX_SEGMENTS or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("PackedRows takes 1 to 3 matrices of the same width")
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        self._tm: TmWeight | None = None

    @property
    def qtype(self) -> int:
        """The type of the first part (``qtypes`` lists them all)."""
        return self.parts[0].qtype

    @property
    def qtypes(self) -> tuple[int, ...]:
        return tuple(p.qtype for p in self.parts)

    @property
    def complete(self) -> bool:
        return True

    def tm_weight(self) -> TmWeight:
        if self._tm is None:
            self._tm = TmWeight.of([(p.qtype, p._ready(), p.shape[0]) for p in self.parts])
        return self._tm

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        dense = torch.cat([p.dequantize() for p in self.parts])
        return dense if out is None else out.copy_(dense)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def pack_parts(parts: list[tuple[int, QuantizedTensor]],
               shape: tuple[int, int]) -> PackedWeight | PackedRows | None:
    """The matrix of ``shape`` from quantized parts ``(first row, blocks)`` that cover its
    rows once each: the part itself if there is one (``PackedWeight.of``); parts of one
    regrouped type copied into one buffer (the layout the kernels read); else one
    ``PackedWeight.of`` per part (views for the types read as stored). None where that
    would take more than ``MAX_SEGMENTS`` parts (the caller keeps the matrix dense)."""
    parts = sorted(parts, key=lambda p: p[0])
    first = 0
    for offset, part in parts:
        if offset != first or part.shape[1] != shape[1]:
            raise ValueError(f"parts of a {shape} matrix overlap or leave rows out")
        first += part.shape[0]
    if first != shape[0]:
        raise ValueError(f"parts cover {first} of the {shape[0]} rows of a {shape} matrix")
    if len(parts) == 1:
        return PackedWeight.of(parts[0][1])
    qtypes = {p.qtype for _, p in parts}
    if len(qtypes) == 1 and parts[0][1].qtype in REGROUPED:
        w = PackedWeight(parts[0][1].qtype, *shape)
        for offset, part in parts:
            w.copy_rows(offset, part)
        return w
    if len(parts) > MAX_SEGMENTS:
        return None
    return PackedRows([PackedWeight.of(p) for _, p in parts])


def packed_linear(x: torch.Tensor, weight: PackedWeight | PackedRows,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x of shape [..., in_features]; float32 math, x's dtype out."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = kernels().gemm_weight(weight.tm_weight(), x2)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], n)
