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
import torch.nn.functional as F


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


class AttentionBackend(ABC):
    """Computes attention for one layer given its slice of the KV cache."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [num_slots, KVH, D]. Returns [T, H, D]."""


class TorchSDPABackend(AttentionBackend):
    """Reference backend on ``torch.nn.functional.scaled_dot_product_attention``.

    Decodes (one query each) are batched into one SDPA call over K/V gathered whole
    blocks at a time from their block tables, padded to the longest context, with a mask
    hiding the padding.
    Grouped-query attention needs no copies: the H query heads are viewed as
    ``[KVH, H // KVH]`` so each group of queries meets its shared K/V head directly.
    Prefill segments run one SDPA call each; a segment with cached context attends to
    the gathered cache with a causal mask shifted by its context length.
    """

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        num_heads, kv_heads = q.shape[1], k.shape[1]
        group = num_heads // kv_heads
        for seg in meta.prefills:
            rows = slice(seg.start, seg.start + seg.query_len)
            qs = q[rows].transpose(0, 1)  # [H, Lq, D]
            if seg.slots is None and k_cache.dtype == k.dtype:  # attend to this step's K/V
                ks, vs = k[rows], v[rows]
            else:  # from the cache, as later steps will read them
                slots = meta.slot_mapping[rows] if seg.slots is None else seg.slots
                ks, vs = k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype)
            o = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1), vs.transpose(0, 1),
                attn_mask=seg.mask, is_causal=seg.mask is None, scale=scale,
                enable_gqa=group > 1)
            out[rows] = o.transpose(0, 1)
        if meta.num_decodes:
            out[meta.decode_rows] = self.decode(q[meta.decode_rows], k_cache, v_cache, meta,
                                                scale)
        return out

    def decode(self, q, k_cache, v_cache, meta, scale):
        """One query per sequence, q [n, H, D] -> [n, H, D]."""
        n, num_heads, d = q.shape
        kv_heads = k_cache.shape[1]
        qd = q.view(n, kv_heads, num_heads // kv_heads, d)
        kd = _gather_blocks(k_cache, meta).to(q.dtype)  # [n, KVH, L, D]
        vd = _gather_blocks(v_cache, meta).to(q.dtype)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        return o.reshape(n, num_heads, d)


class CPUAttentionBackend(TorchSDPABackend):
    """Every query row, prefill or decode, attended by one C kernel that reads the paged
    cache in place (``tm_paged_decode_attention``): no gathered copy of the blocks, no
    padding to the longest sequence, no mask. For float32 queries on the CPU and a float32
    or float16 cache (converted as it is read: half the bytes to fetch).

    A prefill row at position p is computed exactly as a decode at position p would be:
    the same operations in the same order over the same cached keys. So a token's
    attention output, hence the sequence's greedy tokens, does not depend on whether its
    prompt came in one piece, in chunks, or partly from the prefix cache, nor on what else
    is in the batch (SDPA over a whole segment sums in another order than over a chunk
    with cached context)."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if meta.prefills:
            rows = meta.prefill_rows
            table = meta.prefill_seg_table.index_select(0, meta.prefill_row_seg)
            out[rows] = self.kernels.paged_decode_attention(
                q[rows].contiguous(), k_cache, v_cache, table, meta.prefill_seq_lens,
                meta.block_size, scale)
        if meta.num_decodes:
            out[meta.decode_rows] = self.decode(q[meta.decode_rows], k_cache, v_cache, meta,
                                                scale)
        return out

    def decode(self, q, k_cache, v_cache, meta, scale):
        return self.kernels.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens,
            meta.block_size, scale)


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
            from tokenmill.layers.triton_attention import TritonAttentionBackend
        except ImportError:  # no triton: the reference backend still works on the GPU
            return TorchSDPABackend()
        return TritonAttentionBackend()
    return TorchSDPABackend()


def _gather_blocks(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Copies the decodes' blocks out of the paged cache: [n, KVH, max_blocks * bs, D]."""
    table = meta.decode_block_table
    blocks = cache.view(-1, meta.block_size, *cache.shape[1:]).index_select(0, table.view(-1))
    return blocks.view(table.shape[0], -1, *cache.shape[1:]).transpose(1, 2)
