"""Phi-3 and Phi-3.5 (``Phi3ForCausalLM``): a Llama-shaped decoder whose checkpoints
store q/k/v as one ``qkv_proj`` matrix ([q; k; v] rows) and gate/up as one
``gate_up_proj`` ([gate; up] rows), with longrope ("su") rope scaling in the 128k models
(``tokenmill.layers.rotary.LongRopeEmbedding``).

The fused checkpoint matrices are cut into their parts by rows as they are read and
handed to the Llama loader under the q/k/v and gate/up names, so tensor-parallel
sharding and packed (quantized) blocks work as they do for Llama. Models whose config
has a ``sliding_window`` (Phi-3-mini-4k, Phi-3.5-mini) run full attention here, as
llama.cpp runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.rotary import LongRopeEmbedding
from tokenmill.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        if cfg.rope.scaling_type == "longrope":
            rotary = LongRopeEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
            for layer in self.model.layers:
                layer.self_attn.rotary = rotary

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """``qkv_proj`` -> q/k/v_proj and ``gate_up_proj`` -> gate/up_proj, by rows (a
        ``QuantizedTensor`` is cut by rows of blocks, without decoding)."""
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                parts = (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv))
                fused = "qkv_proj"
            elif ".gate_up_proj." in name:
                inter = cfg.intermediate_size
                parts = (("gate_proj", 0, inter), ("up_proj", inter, inter))
                fused = "gate_up_proj"
            else:
                yield name, tensor
                continue
            total = parts[-1][1] + parts[-1][2]
            if tensor.shape[0] != total:
                raise ValueError(f"{name} has {tensor.shape[0]} rows; the config's shapes "
                                 f"need {total}")
            for part, start, rows in parts:
                yield name.replace(fused, part), tensor.narrow(0, start, rows)
