"""Random valid blocks of the GGUF types the kernels read as stored, and gguf-py's
dequantization of them (the reference), shared by the kernel and loader tests."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from tokenmill.gguf.quant_types import QuantizedTensor

Q = GGMLQuantizationType
# type -> the fp16 fields of a block (byte offset, low, high): random bytes elsewhere are
# valid integers and scales; these get magnitudes that keep weights around 0.01-2
FP16_FIELDS = {
    Q.Q5_0: [(0, 1e-3, 5e-2)],
    Q.Q5_1: [(0, 1e-3, 5e-2), (2, -0.4, 0.0)],
    Q.IQ4_NL: [(0, 1e-4, 5e-3)],
    Q.Q2_K: [(80, 1e-3, 5e-2), (82, 1e-3, 5e-2)],
    Q.Q3_K: [(108, 5e-4, 1e-2)],
    Q.Q4_K: [(0, 1e-4, 2e-3), (2, 1e-3, 1e-2)],
    Q.Q5_K: [(0, 5e-5, 1e-3), (2, 1e-3, 1e-2)],
    Q.Q6_K: [(208, 2e-5, 5e-4)],
    Q.IQ4_XS: [(0, 5e-5, 5e-4)],
    Q.Q8_0: [(0, 1e-3, 2e-2)],
}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """Valid random blocks: random bytes, with sane fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    block, bb = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    data = torch.randint(0, 256, (nb, bb), dtype=torch.uint8, generator=g)
    for at, lo, hi in FP16_FIELDS[qtype]:
        values = (torch.rand(nb, generator=g) * (hi - lo) + lo).half()
        data[:, at:at + 2] = values.view(torch.uint8).view(nb, 2)
    return QuantizedTensor(int(qtype), data.view(rows, -1), (rows, cols))


def gguf_dense(t: QuantizedTensor) -> torch.Tensor:
    """gguf-py's dequantization (numpy), the reference."""
    raw = t.data.contiguous().numpy()
    return torch.from_numpy(np.ascontiguousarray(
        gguf_quants.dequantize(raw, Q(t.qtype)), dtype=np.float32)).view(t.shape)
