"""SmolLM3 (``SmolLM3ForCausalLM``): the Llama decoder with rope left out of some layers
(``ModelConfig.no_rope_layers``: every fourth layer in the released models, "NoPE").

Those layers get a rotary table of cos 1 and sin 0, which leaves q and k exactly as they
are (x * 1 - y * 0 == x), so the fused rope kernel and the one-call C decode step run
them unchanged; the table costs max_positions * head_dim * 4 bytes, shared by those
layers.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaForCausalLM


class IdentityRotary(RotaryEmbedding):
    """A rotation by angle 0 at every position."""

    def __init__(self, head_dim: int, max_positions: int) -> None:
        nn.Module.__init__(self)
        self.register_buffer("cos", torch.ones(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.zeros(max_positions, head_dim // 2), persistent=False)


class SmolLM3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        if cfg.no_rope_layers:
            identity = IdentityRotary(cfg.head_dim, cfg.max_position_embeddings)
            for i in cfg.no_rope_layers:
                self.model.layers[i].self_attn.rotary = identity
