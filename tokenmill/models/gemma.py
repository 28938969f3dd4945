"""Gemma 2 and Gemma 3 (text): Llama's skeleton with Gemma's changes.

* Layers alternate sliding-window (local) and full (global) attention
  (``ModelConfig.layer_windows``); Gemma 3's local layers have their own rope
  (``local_rope``, base 10k), its global ones the config's (base 1M, maybe scaled).
* Attention is scaled by ``query_pre_attn_scalar ** -0.5`` (``query_scale``); Gemma 2
  soft-caps attention logits and final logits (``cap * tanh(x / cap)``); Gemma 3 applies
  RMSNorm to each query and key head before rope.
* Four norms per layer: before and after attention, before and after the MLP; the
  post-norms are applied to the branch output before it is added to the residual stream.
* The MLP is gated GELU (tanh approximation); embeddings are multiplied by
  ``sqrt(hidden_size)`` rounded to the model's dtype (as transformers does); the LM head
  is tied to the embeddings.
* RMSNorm multiplies by ``1 + weight``: checkpoints hold ``weight`` (HF's convention; the
  GGUF reader subtracts the 1 llama.cpp's converter added), and ``load_weights`` adds the
  1 in float32, so the model itself uses the plain ``RMSNorm``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.activation import gelu_tanh_and_mul
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata
from tokenmill.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import VocabEmbedding, load_fused_weights


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: AttentionBackend,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.query_scale or cfg.head_dim ** -0.5
        self.window = cfg.window(layer)
        self.softcap = cfg.attn_softcap
        self.rotary = rotary
        self.backend = backend
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k = self.rotary(positions, q, k)
        o = self.backend.forward(q, k, v, kv[0], kv[1], meta, self.scale,
                                 window=self.window, softcap=self.softcap)
        return self.o_proj(o.reshape(t, q_size))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma hidden_activation {cfg.hidden_act!r} is not supported "
                             "(gelu_pytorch_tanh only).")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size,
                                                       [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: AttentionBackend,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, layer, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, residual, positions, kv, meta):
        """x: the previous layer's branch output, already post-normed; returns this
        layer's (branch output, residual stream before it)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, kv, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        glob = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        local = glob if cfg.local_rope is None else RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.local_rope)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, backend, local if cfg.window(i) else glob)
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    """Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3's text model (``Gemma3ForCausalLM``,
    and the language model of ``Gemma3ForConditionalGeneration``)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg, backend)
        self.lm_head = ReplicatedLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # always tied

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        residual = None
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names in (a multimodal checkpoint's vision tower is skipped); every RMSNorm
        weight becomes ``1 + weight``, computed in float32 as transformers does."""
        def renamed():
            for name, tensor in weights:
                name = name.replace("model.language_model.", "model.")
                if name.startswith(("model.vision_tower", "model.multi_modal_projector",
                                    "vision_tower.", "multi_modal_projector.")):
                    continue
                if name.endswith("norm.weight"):
                    tensor = tensor.float() + 1.0
                yield name, tensor
        loaded = load_fused_weights(self, renamed())
        self.lm_head.packed = self.model.embed_tokens.packed
        return loaded

    def required_parameters(self) -> set[str]:
        return {n for n, _ in self.named_parameters()} - {"lm_head.weight"}
