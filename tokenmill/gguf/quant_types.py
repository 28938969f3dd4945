"""Quantized matrices as a GGUF file stores them: ``QuantizedTensor`` carries the packed
blocks of one matrix from the file to the layers unchanged; the tables say how many bytes
a block of 32 weights takes for the types the CPU kernels read in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.gguf.dequant import dequantize

# ggml type id -> bytes per block of 32 weights, for the types the kernels read
PACKED_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0
QTYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
BLOCK = 32


@dataclass
class QuantizedTensor:
    """A 2-D matrix ``shape = (rows, cols)`` as rows of quantized blocks ``data [rows,
    cols / 32 * block_bytes]`` (uint8), straight from a GGUF file."""

    qtype: int
    data: torch.Tensor
    shape: tuple[int, int]

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows, or whole blocks of columns (tensor-parallel shards)."""
        if dim == 0:
            return QuantizedTensor(self.qtype, self.data.narrow(0, start, length),
                                   (length, self.shape[1]))
        if start % BLOCK or length % BLOCK:
            raise ValueError(f"a column shard of a {QTYPE_NAMES[self.qtype]} matrix must "
                             f"cover whole blocks of {BLOCK}")
        bb = PACKED_BLOCK_BYTES[self.qtype]
        return QuantizedTensor(self.qtype,
                               self.data.narrow(1, start // BLOCK * bb, length // BLOCK * bb),
                               (self.shape[0], length))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data.contiguous().view(-1), _ggml_type(self.qtype), self.shape)


def _ggml_type(qtype: int):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype)
