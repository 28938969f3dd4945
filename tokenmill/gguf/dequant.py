"""Dequantize GGUF tensors with torch.

Quantized tensors are rows of fixed-size blocks; each block stores ``block_size`` weights as
small integers plus fp16 scale(s). The torch versions below are element-for-element the same
float32 arithmetic as gguf-py's numpy reference (``gguf.quants``), 5-10x faster on CPU. Other
ggml types fall back to gguf-py.
"""

from __future__ import annotations

import functools

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["can_dequantize", "dequantize"]

Q = GGMLQuantizationType


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 2k]`` holding k little-endian fp16 values -> float32 ``[n, k]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes -> ``[n, 32]``: low nibbles are weights 0-15, high are 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # 34 bytes: d fp16, 32 x int8
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # 18 bytes: d fp16, 32 x 4-bit; w = d*(q-8)
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # 20 bytes: d, m fp16, 32 x 4-bit; w = d*q+m
    dm = _f16(b[:, :4])
    return _nibbles(b[:, 4:]).float().mul_(dm[:, :1]).add_(dm[:, 1:])


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 16 bytes of nibbles plus bit i of the 4 bytes ``qh`` as bit 4 of weight i."""
    bits = torch.arange(32, dtype=torch.int32)
    high = (qh.contiguous().view(torch.int32) >> bits) & 1  # little-endian u32, bit i
    return _nibbles(qs) | (high.to(torch.uint8) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # 22 bytes: d, qh[4], qs[16]; w = d*(q-16)
    return (_five_bits(b[:, 2:6], b[:, 6:]).float() - 16).mul_(_f16(b[:, :2]))


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # 24 bytes: d, m, qh[4], qs[16]; w = d*q+m
    dm = _f16(b[:, :4])
    return _five_bits(b[:, 4:8], b[:, 8:]).float().mul_(dm[:, :1]).add_(dm[:, 1:])


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep
    their low 4 bits in bytes 8-11 and their top 2 bits in the spare bits of bytes 0-7.
    """
    s = b.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=1)
    mins = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def _k_quant_4_5(b: torch.Tensor, qh: torch.Tensor | None) -> torch.Tensor:
    """Q4_K/Q5_K super-block of 256 = 8 sub-blocks of 32: w = d*sc[j]*q - dmin*m[j].

    The 128 bytes of 4-bit values come in 4 groups of 32: low nibbles feed sub-block
    2g, high nibbles 2g+1. Q5_K adds bit j of ``qh[i]`` as bit 4 of weight i of sub-block j.
    """
    n = b.shape[0]
    dm = _f16(b[:, :4])
    scales, mins = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    if qh is not None:
        bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        q |= ((qh.reshape(n, 1, 32) >> bits) & 1) << 4
    w = q.float().mul_((dm[:, :1] * scales).unsqueeze(-1))
    return w.sub_((dm[:, 1:] * mins).unsqueeze(-1)).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # 144 bytes: d, dmin, scales[12], qs[128]
    return _k_quant_4_5(b, None)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # 176 bytes: d, dmin, scales[12], qh[32], qs[128]
    return _k_quant_4_5(b, b[:, 16:48])


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """210 bytes: ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales, d fp16.

    256 weights = 2 halves of 128; in each half, ql's 64 bytes give weights 0-63 (low
    nibble) and 64-127 (high nibble), qh's 32 bytes give bits 4-5 for four runs of 32
    weights (shifts 0, 2, 4, 6). w = d * scale[i // 16] * (q - 32).
    """
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float().sub_(32).reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return q.mul_((_f16(b[:, 208:]) * scales).unsqueeze(-1)).reshape(n, 256)


_BLOCK_DEQUANT = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
                  Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_FLOAT_VIEWS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@functools.cache
def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Can ``dequantize`` turn tensors of this type into floats (here or with gguf-py)?"""
    if qtype in _FLOAT_VIEWS or qtype in _BLOCK_DEQUANT:
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Turn a tensor's raw bytes (1-D uint8) into a float32 tensor of HF ``shape``."""
    if qtype in _FLOAT_VIEWS:
        out = raw.view(_FLOAT_VIEWS[qtype]).float()
    elif qtype in _BLOCK_DEQUANT:
        out = _BLOCK_DEQUANT[qtype](raw.view(-1, GGML_QUANT_SIZES[qtype][1]))
    else:
        try:
            values = gguf.quants.dequantize(raw.numpy(), qtype)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor type {qtype.name} cannot be dequantized; "
                             "re-quantize the model, e.g. to Q4_K_M or Q8_0.") from None
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out.reshape(shape)
