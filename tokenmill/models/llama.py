"""The Llama family: Llama (incl. SmolLM, Llama 3 rope scaling), Mistral, Qwen2 (q/k/v
bias) and Qwen3 (per-head RMSNorm on q and k).

The forward pass takes a flat batch of tokens (no padding) with their positions and an
``AttentionMetadata``; it returns hidden states, and ``compute_logits`` turns only the
rows that need it into logits (a prefill chunk samples at most its last position).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata
from tokenmill.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.quantization import PackedWeight, QuantizedTensor, packable
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.cpu_decode import CPUDecodePath

# checkpoint name fragment -> (our fused parameter's fragment, shard id)
_FUSED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class VocabEmbedding(nn.Module):
    """Token embeddings (replicated on every rank; a vocab-parallel split can come later).
    A quantized GGUF table stays packed; a lookup decodes just the rows it needs."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.packed: PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if isinstance(loaded, QuantizedTensor) and packable(loaded.qtype):
            if tuple(loaded.shape) != tuple(param.shape):
                raise ValueError(f"embedding {tuple(loaded.shape)} in the checkpoint, "
                                 f"{tuple(param.shape)} in the model")
            self.packed = PackedWeight.of(loaded)
            return
        param.data.copy_(loaded.dequantize() if isinstance(loaded, QuantizedTensor) else loaded)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(ids).to(self.weight.dtype)
        return nn.functional.embedding(ids, self.weight)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.uniform_window  # Mistral's sliding window, the same in every layer
        # one table for all layers (LlamaModel shares it): [max positions, head_dim / 2]
        # cos and sin, 8 MiB for a 32k context of 64-dim heads
        self.rotary = rotary or RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                                cfg.rope)
        self.backend = backend
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rotated = self.q_norm is None and self.rotary.rotate_fused_(
            positions, qkv, self.num_heads, self.num_kv_heads)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rotated:
            q, k = self.rotary(positions, q, k)
        o = self.backend.forward(q, k, v, kv[0], kv[1], meta, self.scale, window=self.window)
        return self.o_proj(o.reshape(t, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only).")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size,
                                                       [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, positions, kv, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, rotary)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Also serves Mistral, Qwen2 and Qwen3: their differences are config flags."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend)
        self.lm_head = ReplicatedLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._decode_path: CPUDecodePath | bool | None = None  # see forward()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self._decode_path is None:  # decided once, after the weights are in
            self._decode_path = CPUDecodePath.build(self) or False
        if self._decode_path and self._decode_path.applies(x, meta, kv_caches):
            x, residual = self._decode_path(x, positions, kv_caches, meta)
        else:
            residual = None
            for layer, kv in zip(self.model.layers, kv_caches, strict=True):
                x, residual = layer(x, residual, positions, kv, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors (HF names) into our (possibly fused, sharded)
        parameters. Returns the names of the parameters that were filled."""
        loaded = load_fused_weights(self, weights)
        if self.config.tie_word_embeddings:  # the LM head reads the embedding's blocks
            self.lm_head.packed = self.model.embed_tokens.packed
        return loaded

    def required_parameters(self) -> set[str]:
        names = {n for n, _ in self.named_parameters()}
        if self.config.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names



def load_fused_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                       ) -> set[str]:
    """Copies checkpoint tensors (HF names) into ``model``'s parameters, q/k/v and
    gate/up into their fused ones (``_FUSED``), through each parameter's ``weight_loader``
    where it has one. Returns the names of the parameters filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg = model.config
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target, shard = name, None
        for part, fused, shard_id in _FUSED:
            if f".{part}." in name:
                target, shard = name.replace(part, fused), shard_id
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in "
                             f"{type(model).__name__} ({cfg.architecture})")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if isinstance(tensor, QuantizedTensor):
            if loader is None:
                tensor = tensor.dequantize()
        else:
            tensor = tensor.to(param.dtype)
        if loader is None:
            param.data.copy_(tensor)
        elif shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        loaded.add(target)
    return loaded
