"""Quantized matrices as a GGUF file stores them: ``QuantizedTensor`` carries the packed
blocks of one matrix from the file to the layers unchanged; the tables say how many
weights and bytes a block takes for the types the CPU kernels read in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.gguf.dequant import dequantize

# ggml type id -> (weights, bytes) per block, for the types the kernels read: blocks of 32,
# or the K-quants' super-blocks of 256 (8 sub-blocks of 32 with their own scales)
PACKED_BLOCKS = {
    2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 20: (32, 18),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    23: (256, 136),
}
PACKED_BLOCK_BYTES = {q: b for q, (_, b) in PACKED_BLOCKS.items()}
BLOCK_WEIGHTS = {q: w for q, (w, _) in PACKED_BLOCKS.items()}
QTYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
               11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 23: "IQ4_XS"}


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of ``cols`` weights in blocks of ``qtype``."""
    if cols % BLOCK_WEIGHTS[qtype]:
        raise ValueError(f"a {QTYPE_NAMES[qtype]} row of {cols} weights is not whole blocks "
                         f"of {BLOCK_WEIGHTS[qtype]}")
    return cols // BLOCK_WEIGHTS[qtype] * PACKED_BLOCK_BYTES[qtype]


@dataclass
class QuantizedTensor:
    """A 2-D matrix ``shape = (rows, cols)`` as rows of quantized blocks ``data [rows,
    cols / block_weights * block_bytes]`` (uint8), straight from a GGUF file."""

    qtype: int
    data: torch.Tensor
    shape: tuple[int, int]

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows, or whole blocks of columns (tensor-parallel shards)."""
        if dim == 0:
            return QuantizedTensor(self.qtype, self.data.narrow(0, start, length),
                                   (length, self.shape[1]))
        block = BLOCK_WEIGHTS[self.qtype]
        if start % block or length % block:
            raise ValueError(f"a column shard of a {QTYPE_NAMES[self.qtype]} matrix must "
                             f"cover whole blocks of {block}")
        bb = PACKED_BLOCK_BYTES[self.qtype]
        return QuantizedTensor(self.qtype,
                               self.data.narrow(1, start // block * bb, length // block * bb),
                               (self.shape[0], length))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data.contiguous().view(-1), _ggml_type(self.qtype), self.shape)


def _ggml_type(qtype: int):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype)
