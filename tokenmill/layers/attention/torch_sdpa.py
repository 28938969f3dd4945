"""The reference attention backend, on ``torch.nn.functional.scaled_dot_product_attention``:
runs on any device and dtype; the other backends are tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.attention.base import AttentionBackend, AttentionMetadata


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

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
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
            if window is None and softcap is None:
                o = F.scaled_dot_product_attention(
                    qs, ks.transpose(0, 1), vs.transpose(0, 1),
                    attn_mask=seg.mask, is_causal=seg.mask is None, scale=scale,
                    enable_gqa=group > 1)
            else:
                mask = _windowed(seg.mask, seg.context_len, seg.query_len, window, q.device)
                o = attend(qs.view(kv_heads, group, seg.query_len, -1),
                           ks.transpose(0, 1).unsqueeze(1), vs.transpose(0, 1).unsqueeze(1),
                           mask, scale, softcap).view_as(qs)
            out[rows] = o.transpose(0, 1)
        if meta.num_decodes:
            out[meta.decode_rows] = self.decode(q[meta.decode_rows], k_cache, v_cache, meta,
                                                scale, window, softcap)
        return out

    def decode(self, q, k_cache, v_cache, meta, scale, window=None, softcap=None):
        """One query per sequence, q [n, H, D] -> [n, H, D]."""
        n, num_heads, d = q.shape
        kv_heads = k_cache.shape[1]
        qd = q.view(n, kv_heads, num_heads // kv_heads, d)
        kd = _gather_blocks(k_cache, meta).to(q.dtype)  # [n, KVH, L, D]
        vd = _gather_blocks(v_cache, meta).to(q.dtype)
        if window is None and softcap is None:
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask,
                                               scale=scale)
        else:
            mask = meta.decode_mask
            if window is not None:  # key j visible iff j >= seq_len - window
                keys = torch.arange(mask.shape[-1], device=mask.device)
                first = (meta.decode_seq_lens.to(mask.device) - window).view(n, 1, 1, 1)
                mask = mask & (keys >= first)
            o = attend(qd, kd, vd, mask, scale, softcap)
        return o.reshape(n, num_heads, d)


def _windowed(mask: torch.Tensor | None, context_len: int, query_len: int,
              window: int | None, device) -> torch.Tensor:
    """A prefill segment's [query_len, context_len + query_len] visibility: causal (or
    ``mask``), and with a window, only keys less than ``window`` positions back."""
    q_pos = torch.arange(context_len, context_len + query_len, device=device)[:, None]
    k_pos = torch.arange(context_len + query_len, device=device)[None, :]
    visible = k_pos <= q_pos if mask is None else mask
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    return visible


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float, softcap: float | None) -> torch.Tensor:
    """Attention written out, for what SDPA cannot do (soft-capped logits): scores
    ``q k^T * scale``, with ``softcap`` mapped through ``cap * tanh(s / cap)``, masked
    (``mask`` True = visible, broadcast over the scores), softmax in float32. q [..., Lq, D],
    k and v [..., Lk, D] broadcastable to q's leading dims."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _gather_blocks(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Copies the decodes' blocks out of the paged cache: [n, KVH, max_blocks * bs, D]."""
    table = meta.decode_block_table
    blocks = cache.view(-1, meta.block_size, *cache.shape[1:]).index_select(0, table.view(-1))
    return blocks.view(table.shape[0], -1, *cache.shape[1:]).transpose(1, 2)
