"""The CPU attention backend: every query row through the C paged-attention kernel."""

from __future__ import annotations

import torch

from tokenmill.layers.attention.torch_sdpa import TorchSDPABackend


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

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
        if softcap is not None or window is not None:  # not in the C kernel: the reference
            return super().forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
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

    def decode(self, q, k_cache, v_cache, meta, scale, window=None, softcap=None):
        if window is not None or softcap is not None:
            return super().decode(q, k_cache, v_cache, meta, scale, window, softcap)
        return self.kernels.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens,
            meta.block_size, scale)
