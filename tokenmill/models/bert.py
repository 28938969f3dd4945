"""BERT encoders: ``BertModel`` (embedders such as all-MiniLM) and
``BertForSequenceClassification`` (cross-encoders that score a query/document pair).

The forward pass takes a flat batch (sequences laid end to end, no padding) with each
token's position and token type, and returns the last layer's hidden states [T, hidden].
Each layer is post-LayerNorm: ``x = LN(x + attn(x)); x = LN(x + ffn(x))`` with GELU (erf)
in the feed-forward; attention is bidirectional within a sequence
(``AttentionBackend.forward_bidirectional``) and keeps no KV cache. The projections are
tokenmill's linear layers (q/k/v fused), so quantized weights stay packed.

The classifier follows transformers: ``logits = classifier(tanh(pooler(h[CLS])))``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from tokenmill.layers.quantization import QuantizedTensor
from tokenmill.models.llama import VocabEmbedding

ENCODER_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT checkpoint (``config.json`` keys of transformers' BertConfig)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    num_labels: int  # outputs of the classifier head (0: no head)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        arch = (hf.get("architectures") or ["BertModel"])[0]
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act {act!r} is not supported for BERT (gelu only).")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for BERT.")
        labels = 0
        if arch == "BertForSequenceClassification":
            labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
        return cls(architecture=arch, vocab_size=hf["vocab_size"],
                   hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), num_labels=labels)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, positions, token_types):
        x = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_types))
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, backend: AttentionBackend) -> None:
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_heads, cfg.num_heads,
                                     bias=True)
        self.attn_out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.up = ReplicatedLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down = ReplicatedLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.heads, self.head_dim, self.backend = self.qkv.num_heads, head_dim, backend

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.heads, self.head_dim).unbind(1)
        o = self.backend.forward_bidirectional(q, k, v, seq_lens, self.head_dim ** -0.5)
        x = self.attn_norm(x + self.attn_out(o.reshape(t, -1)))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


# checkpoint name fragment (after "encoder.layer.N.") -> (our name, fused shard id)
_LAYER_NAMES = (
    ("attention.self.query.", "qkv.", "q"),
    ("attention.self.key.", "qkv.", "k"),
    ("attention.self.value.", "qkv.", "v"),
    ("attention.output.dense.", "attn_out.", None),
    ("attention.output.LayerNorm.", "attn_norm.", None),
    ("intermediate.dense.", "up.", None),
    ("output.dense.", "down.", None),
    ("output.LayerNorm.", "out_norm.", None),
)


class BertModel(nn.Module):
    """The encoder; ``forward`` returns the last hidden states of a flat batch."""

    def __init__(self, cfg: BertConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg, backend) for _ in range(cfg.num_layers))
        if cfg.num_labels:
            self.pooler = ReplicatedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
            self.classifier = ReplicatedLinear(cfg.hidden_size, cfg.num_labels, bias=True)

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, seq_lens)
        return x

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] states of each sequence's first token -> [B, num_labels] logits."""
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))

    def _target(self, name: str) -> tuple[str | None, str | None]:
        name = name.removeprefix("bert.")
        if name.startswith("encoder.layer."):
            index, rest = name.removeprefix("encoder.layer.").split(".", 1)
            for part, ours, shard in _LAYER_NAMES:
                if rest.startswith(part):
                    return f"layers.{index}.{ours}{rest.removeprefix(part)}", shard
            return name, None
        if name.startswith("pooler.dense."):
            return (name.replace("pooler.dense.", "pooler.") if self.config.num_labels
                    else None), None
        if "position_ids" in name:
            return None, None
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copies checkpoint tensors (transformers' names, with or without the ``bert.``
        prefix) into our parameters; returns the names of those filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = self._target(name)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{self.config.architecture}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                if isinstance(tensor, QuantizedTensor):
                    tensor = tensor.dequantize()
                param.data.copy_(tensor.to(param.dtype))
            elif shard is None:
                loader(param, tensor if isinstance(tensor, QuantizedTensor)
                       else tensor.to(param.dtype))
            else:
                loader(param, tensor if isinstance(tensor, QuantizedTensor)
                       else tensor.to(param.dtype), shard)
            loaded.add(target)
        return loaded

    def required_parameters(self) -> set[str]:
        return {n for n, _ in self.named_parameters()}
