"""Gated activations for the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import fused_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x holds [gate | up] side by side (fused gate_up_proj); returns silu(gate) * up."""
    k = fused_kernels(x)
    if k is not None:
        return k.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x holds [gate | up] side by side; returns gelu(gate, tanh approximation) * up
    (Gemma's MLP)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
