"""Attention over the paged KV cache.

The model runs on a *flat* batch: the new tokens of every scheduled request laid end to
end, no padding. Request ``r`` owns rows ``[query_start[r], query_start[r] + query_len[r])``
of the batch; its first new token sits at position ``context_len[r]`` (the tokens before it
are already in the cache). One ``AttentionMetadata`` per step describes that layout and is
passed explicitly to every layer.

Backends implement ``forward``: write this step's K/V into the cache at ``slot_mapping``
(slot = block_id * block_size + offset), then attend each query to all of its request's
keys up to and including its own position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class PrefillSegment:
    """A request with several new tokens (a prompt, a prompt chunk or a recompute)."""

    start: int                  # first row in the flat batch
    query_len: int
    context_len: int            # tokens already in the cache before this step
    slots: torch.Tensor | None  # [context_len + query_len] cache slots of all its tokens
    mask: torch.Tensor | None   # [query_len, context_len + query_len] bool; None = causal


@dataclass
class AttentionMetadata:
    """The layout of one step's flat batch, built once per step by the model runner."""

    slot_mapping: torch.Tensor      # [num_tokens] where each new token's K/V goes
    prefills: list[PrefillSegment]
    decode_rows: torch.Tensor       # [num_decodes] rows of the single-token requests
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks] block ids (padded with 0)
    decode_mask: torch.Tensor       # [num_decodes, 1, 1, max_blocks * block_size] bool
    decode_seq_lens: torch.Tensor   # [num_decodes] int64, cached tokens incl. this one
    num_decodes: int
    block_size: int
    # the prefill segments' block tables (in the order of ``prefills``), and every prefill
    # row as if it were a decode: its segment and the number of positions it attends to
    # (its position + 1), for backends that read the paged cache per query row
    prefill_seg_table: torch.Tensor | None = None  # [num_prefills, max_blocks]
    prefill_rows: torch.Tensor | None = None       # [P] rows of the flat batch
    prefill_row_seg: torch.Tensor | None = None    # [P] index into prefill_seg_table
    prefill_seq_lens: torch.Tensor | None = None   # [P]


# attention scores (B x H x L x L) one padded, masked SDPA call may hold (128 MiB float32)
_MAX_SCORES = 32 * 2**20


class AttentionBackend(ABC):
    """Computes attention for one layer given its slice of the KV cache."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [num_slots, KVH, D]. Returns [T, H, D].
        ``window``: a query at position p sees only keys at positions > p - window
        (sliding-window attention). ``softcap``: scores s become softcap * tanh(s / softcap)
        before the mask and softmax (Gemma 2)."""

    def forward_bidirectional(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              seq_lens: list[int], scale: float) -> torch.Tensor:
        """Encoder attention, no cache: every token of a sequence attends to every token
        of the same sequence (no causal mask). q, k, v: [T, H, D] for sequences laid end to
        end with ``seq_lens`` tokens each; returns [T, H, D].

        The sequences are padded to the longest into one [B, H, L, D] batch with a mask
        hiding the padded keys: one SDPA call per layer (callers keep padding low by
        batching inputs of similar length). When that masked batch would hold more than
        ``_MAX_SCORES`` attention scores (long inputs), each sequence gets its own unmasked
        call instead. Backends may override it with a kernel."""
        num, heads, dim = q.shape
        longest = max(seq_lens)
        if len(seq_lens) == 1 or len(seq_lens) * heads * longest * longest > _MAX_SCORES:
            # one call per sequence: no mask, so SDPA's fused kernel never materializes
            # the [L, L] scores of long inputs
            out = torch.empty_like(q)
            at = 0
            for n in seq_lens:
                rows = slice(at, at + n)
                out[rows] = torch.nn.functional.scaled_dot_product_attention(
                    q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                    scale=scale).transpose(0, 1)
                at += n
            return out
        lens = torch.tensor(seq_lens)
        valid = torch.arange(longest)[None, :] < lens[:, None]        # [B, L]
        rows = valid.reshape(-1).nonzero().squeeze(1).to(q.device)
        padded = []
        for t in (q, k, v):
            buf = t.new_zeros(len(seq_lens) * longest, heads, dim)
            buf.index_copy_(0, rows, t)
            padded.append(buf.view(len(seq_lens), longest, heads, dim).transpose(1, 2))
        mask = valid.to(q.device)[:, None, None, :]                  # [B, 1, 1, L]
        o = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=mask,
                                                             scale=scale)
        return o.transpose(1, 2).reshape(-1, heads, dim).index_select(0, rows)
