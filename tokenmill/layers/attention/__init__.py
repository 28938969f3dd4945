"""Attention over the paged KV cache: the step's layout (``base``) and one backend per file
(``torch_sdpa``: the reference; ``cpu``: the C kernels; ``triton``: the GPU kernels).
``attention_backend`` picks the fastest one for where the cache lives."""

from __future__ import annotations

import torch

from tokenmill.layers.attention.base import AttentionBackend, AttentionMetadata, PrefillSegment
from tokenmill.layers.attention.cpu import CPUAttentionBackend
from tokenmill.layers.attention.torch_sdpa import TorchSDPABackend

__all__ = ["AttentionBackend", "AttentionMetadata", "CPUAttentionBackend", "PrefillSegment",
           "TorchSDPABackend", "attention_backend"]


def attention_backend(device: str, dtype: torch.dtype,
                      kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """The fastest backend for where the KV cache lives: the C kernels on the CPU (float32
    model, float32 or float16 cache), the Triton kernels on a GPU, else the torch
    reference."""
    kv_dtype = kv_dtype or dtype
    if device == "cpu" and dtype == torch.float32 and kv_dtype in (torch.float32,
                                                                   torch.float16):
        from tokenmill.kernels.cpu import kernels

        if kernels() is not None:
            return CPUAttentionBackend(kernels())
    if device.startswith("cuda"):
        try:
            from tokenmill.layers.attention.triton import TritonAttentionBackend
        except ImportError:  # no triton: the reference backend still works on the GPU
            return TorchSDPABackend()
        return TritonAttentionBackend()
    return TorchSDPABackend()
