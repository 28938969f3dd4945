"""The Mixture-of-Experts families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Each is the Llama decoder with its feed-forward replaced, in the layers
``ModelConfig.moe`` makes sparse, by ``tokenmill.layers.fused_moe.FusedMoE`` (router,
grouped experts, Qwen2-MoE's shared expert). Attention is Llama's, with the family's
options: q/k/v biases (Qwen2-MoE), per-head q/k RMSNorm (Qwen3-MoE), and for OLMoE an
RMSNorm over all heads of q and of k at once (``FullWidthQKNorm``).

Checkpoint names are the Qwen-MoE ones (``mlp.gate``, ``mlp.experts.E.gate_proj``, ...);
Mixtral folders are read under those names (``tokenmill.loader.hf_folder``) and GGUF
files' merged expert tensors are cut into them (``tokenmill.loader.gguf_checkpoint``).
The one-call C decode step (``cpu_decode``) is for dense MLPs, so these models decode
through the Python layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from tokenmill.config import ModelConfig
from tokenmill.distributed import tp_size
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.fused_moe import FusedMoE
from tokenmill.layers.norm import RMSNorm
from tokenmill.models.llama import LlamaForCausalLM, LlamaMLP


class FullWidthQKNorm(RMSNorm):
    """OLMoE's q/k norm: one RMSNorm over all heads of a token's q (or k), taking and
    returning the per-head view [T, heads, head_dim]."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            raise ValueError("FullWidthQKNorm takes no residual")
        # contiguous: the fused C norm (rows independent of the batch) takes it
        return super().forward(x.reshape(*x.shape[:-2], -1).contiguous()).view(x.shape)


class MoEForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        if cfg.moe is None:
            raise ValueError(f"{cfg.architecture} needs a Mixture-of-Experts config.")
        # built with 1-wide dense MLPs, replaced below (no full-size weights allocated
        # only to be dropped)
        super().__init__(dataclasses.replace(cfg, intermediate_size=1), backend)
        self.config = cfg
        self._decode_path = False
        full_width_norm = cfg.architecture == "OlmoeForCausalLM"
        if full_width_norm and tp_size() != 1:
            raise ValueError("OLMoE's q/k norm spans all heads; it runs on one rank only.")
        for i, layer in enumerate(self.model.layers):
            dense = i in cfg.moe.dense_layers
            layer.mlp = LlamaMLP(cfg) if dense else FusedMoE(cfg.hidden_size, cfg.moe)
            if full_width_norm:
                att = layer.self_attn
                att.q_norm = FullWidthQKNorm(att.num_heads * cfg.head_dim, cfg.rms_norm_eps)
                att.k_norm = FullWidthQKNorm(att.num_kv_heads * cfg.head_dim,
                                             cfg.rms_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(_shared_gate_as_matrix(weights))


def _shared_gate_as_matrix(weights: Iterable[tuple[str, torch.Tensor]]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen2-MoE's one-output shared-expert gate as a [1, hidden] matrix (some GGUF
    files store it as a vector)."""
    for name, tensor in weights:
        if name.endswith("shared_expert_gate.weight") and len(tensor.shape) == 1:
            tensor = tensor.reshape(1, -1)
        yield name, tensor
