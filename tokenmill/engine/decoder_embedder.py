"""A decoder (Llama family) run as an embedder for ``--task embed``.

``DecoderEmbedder`` gives a causal language model the encoder interface the
``EmbeddingEngine`` drives (``forward(ids, positions, token_types, seq_lens)`` -> last
hidden states, after the final norm): each input is one prefill segment of a flat batch,
attended causally by the model's own attention backend, with a scratch K/V buffer the
size of the batch (slot i holds token i) that is dropped after the forward, so nothing
stays cached. Pooling defaults to the last token (the only one that has read the whole
input under a causal mask); ``mean`` works too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.engine.model_loading import load_model
from tokenmill.layers.attention import AttentionMetadata, PrefillSegment, TorchSDPABackend


@dataclass(frozen=True)
class DecoderEmbedderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_labels: int = 0


class DecoderEmbedder(nn.Module):
    def __init__(self, model: nn.Module, cfg) -> None:
        super().__init__()
        self.model = model
        self.kv_heads, self.head_dim, self.layers = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        self.max_position_embeddings = cfg.max_position_embeddings
        self.config = DecoderEmbedderConfig(cfg.architecture, cfg.vocab_size, cfg.hidden_size)

    @classmethod
    def load(cls, config: EngineConfig) -> DecoderEmbedder:
        model, cfg = load_model(config, TorchSDPABackend(), show_progress=False)
        return cls(model, cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        t, dev = input_ids.shape[0], input_ids.device
        starts = [0, *torch.tensor(seq_lens).cumsum(0).tolist()[:-1]]
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t, device=dev),
            prefills=[PrefillSegment(s, n, 0, None, None)
                      for s, n in zip(starts, seq_lens, strict=True)],
            decode_rows=empty, decode_block_table=empty.view(0, 0),
            decode_mask=torch.zeros(0, 1, 1, 0, dtype=torch.bool, device=dev),
            decode_seq_lens=empty, num_decodes=0, block_size=16)
        dtype = next(self.model.parameters()).dtype
        kv = [(torch.empty(t, self.kv_heads, self.head_dim, dtype=dtype, device=dev),
               torch.empty(t, self.kv_heads, self.head_dim, dtype=dtype, device=dev))
              for _ in range(self.layers)]
        return self.model(input_ids, positions, kv, meta)

    def load_weights(self, weights) -> set[str]:  # loaded by load_model already
        return set()

    def required_parameters(self) -> set[str]:
        return set()
