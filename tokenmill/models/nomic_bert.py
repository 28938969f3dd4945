"""nomic-bert (nomic-embed-text): a BERT-shaped encoder with rotary positions and a
SwiGLU feed-forward, read from GGUF (``general.architecture = nomic-bert``).

Per token: ``x = LN(tok_embd[id] + token_types[type])`` (no position embeddings). Per
layer, post-LayerNorm as BERT: ``x = LN(x + W_o attn(rope(q), rope(k), v))`` with q, k, v
from one fused projection (no biases) and rotary embeddings in the rotate-half (NeoX)
form over the whole head; then ``x = LN(x + W_down(silu(W_gate x) * W_up x))``.
Attention is bidirectional (``AttentionBackend.forward_bidirectional``), no KV cache.
Weights keep their GGUF names; quantized matrices stay packed in tokenmill's linear layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.config import RopeConfig
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from tokenmill.layers.quantization import QuantizedTensor
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.bert import BertConfig
from tokenmill.models.llama import VocabEmbedding


@dataclass(frozen=True)
class NomicBertConfig(BertConfig):
    """BERT's shape plus the rotary base; no classifier head (``num_labels`` 0)."""

    rope_theta: float = 1000.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> NomicBertConfig:
        return cls(architecture="NomicBertModel", num_labels=0, vocab_size=hf["vocab_size"],
                   hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf["max_position_embeddings"],
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   rope_theta=hf.get("rope_theta", 1000.0))


class NomicBertLayer(nn.Module):
    def __init__(self, cfg: NomicBertConfig, backend: AttentionBackend,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.attn_qkv = ReplicatedLinear(h, 3 * h, bias=False)
        self.attn_output = ReplicatedLinear(h, h, bias=False)
        self.attn_output_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_gate_up = MergedColumnParallelLinear(h, [cfg.intermediate_size] * 2)
        self.ffn_down = ReplicatedLinear(cfg.intermediate_size, h, bias=False)
        self.layer_output_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.rotary, self.backend = rotary, backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                seq_lens: list[int]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.attn_qkv(x).view(t, 3, self.heads, self.head_dim).unbind(1)
        q, k = self.rotary(positions, q, k)
        o = self.backend.forward_bidirectional(q, k, v, seq_lens, self.head_dim ** -0.5)
        x = self.attn_output_norm(x + self.attn_output(o.reshape(t, -1)))
        return self.layer_output_norm(x + self.ffn_down(silu_and_mul(self.ffn_gate_up(x))))


class NomicBertModel(nn.Module):
    def __init__(self, cfg: NomicBertConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.token_embd = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.token_embd_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        head_dim = cfg.hidden_size // cfg.num_heads
        rotary = RotaryEmbedding(head_dim, cfg.max_position_embeddings,
                                 RopeConfig(theta=cfg.rope_theta))
        self.blk = nn.ModuleList(NomicBertLayer(cfg, backend, rotary)
                                 for _ in range(cfg.num_layers))

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = self.token_embd_norm(self.token_embd(input_ids) + self.token_types(token_type_ids))
        for layer in self.blk:
            x = layer(x, positions, seq_lens)
        return x

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """GGUF tensor names: ``ffn_gate`` / ``ffn_up`` fill the fused gate_up layer."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            shard = None
            for part, index in ((".ffn_gate.", 0), (".ffn_up.", 1)):
                if part in name:
                    name, shard = name.replace(part, ".ffn_gate_up."), index
            if name not in params:
                raise ValueError(f"GGUF tensor {name!r} has no place in nomic-bert")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if not isinstance(tensor, QuantizedTensor):
                tensor = tensor.to(param.dtype)
            if loader is None:
                param.data.copy_(tensor.dequantize() if isinstance(tensor, QuantizedTensor)
                                 else tensor)
            elif shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        return loaded

    def required_parameters(self) -> set[str]:
        return {n for n, _ in self.named_parameters()}
