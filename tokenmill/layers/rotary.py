"""Rotary position embeddings (rotate-half / GPT-NeoX layout, as HF Llama uses).

Each pair of dimensions ``(i, i + d/2)`` of a query or key at position ``p`` is rotated by
the angle ``p * inv_freq[i]``. Scaling variants only change ``inv_freq``:
- ``linear``: every frequency divided by ``factor`` (positions stretched);
- ``llama3``: high frequencies kept, low frequencies divided by ``factor``, and a smooth
  blend in between, set by ``low_freq_factor``/``high_freq_factor`` over the original
  context length.
cos/sin are tabulated once for every position up to the context length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.config import RopeConfig
from tokenmill.kernels.cpu import fused_kernels


def inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64)
                                     .float() / rotary_dim))
    if rope.scaling_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(rope, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, d/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def rotate_fused_(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int,
                      num_kv_heads: int) -> bool:
        """Rotates the q and k heads of a fused qkv output [T, (H + 2 KVH) * D] in place
        (one C call for both); False where the kernel does not apply."""
        k = fused_kernels(qkv, self.cos)
        if k is None or positions.dtype != torch.int64 or not positions.is_contiguous():
            return False
        k.rope_(qkv, num_heads + num_kv_heads, 2 * self.cos.shape[1], positions, self.cos,
                self.sin)
        return True

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions: [T]; q: [T, H, D]; k: [T, KVH, D]. Returns rotated (q, k)."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class LongRopeEmbedding(RotaryEmbedding):
    """Phi-3's longrope ("su"): ``inv_freq[i] = 1 / (ext[i] * theta^(2i/d))`` with
    ``ext = short_factor`` for positions below ``original_max_position_embeddings`` and
    ``long_factor`` from there on; cos and sin are multiplied by ``attention_factor``
    (which scales the attention logits by its square).

    transformers switches the whole forward pass to the long factors once the longest
    position in it passes the original length; here each position takes its own table
    row, so a token's rotation never depends on what is batched with it. Both agree on
    every sequence whose prompt fits the original length (decode steps past it use the
    long factors in both); a prompt longer than that rotates its first positions with the
    short factors here, with the long ones in transformers (vLLM takes the long table
    for a whole batch once any position in it is past)."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        nn.Module.__init__(self)
        if 2 * len(rope.short_factor) != head_dim:
            raise ValueError(f"longrope needs {head_dim // 2} short/long factors, got "
                             f"{len(rope.short_factor)}.")
        base = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        split = min(rope.original_max_position_embeddings, max_positions)
        t = torch.arange(max_positions, dtype=torch.float32)
        tables = []
        for positions, ext in ((t[:split], rope.short_factor), (t[split:], rope.long_factor)):
            inv_freq = 1.0 / (torch.tensor(ext, dtype=torch.float32) * base)
            tables.append(torch.outer(positions, inv_freq))
        freqs = torch.cat(tables)
        self.register_buffer("cos", freqs.cos() * rope.attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * rope.attention_factor, persistent=False)
