"""Paged attention in Triton, for the GPU: K/V writes, prefill over block tables, and
split-K decode (flash-decoding).

Three kernels, all reading the paged cache ``[num_slots, KVH, D]`` in place (slot = block
id * block_size + offset) through block tables, never gathering it:

* ``_store_kv``: one program per new token copies its K and V rows to their slots
  (``slot_mapping``); a negative slot is skipped (padding rows).
* ``_prefill``: a prefill segment (a prompt, a prompt chunk after cached context, a
  recompute) is cut into tiles of ``BLOCK_M`` query rows; one program per (tile, query
  head) walks the segment's KV blocks up to the tile's last position with an online
  softmax (running max and sum, rescaled accumulator), masking keys after each row's
  position (causal, shifted by the context length). Its own new keys were stored first,
  so cached context and new tokens are read the same way.
* ``_decode_split`` + ``_decode_merge``: one query per sequence. A long context on a
  single program would serialize, so the context is split into ``num_splits`` ranges of
  blocks; each program handles one (sequence, KV head, split), all query heads of the
  group at once (grouped-query attention packed into the rows of one dot product), and
  writes a partial (max, sum, accumulator); the merge rescales the partials to the
  global max and combines them.

Accumulation is float32 whatever the cache dtype; float32 inputs are multiplied in IEEE
precision (no TF32). Tested under Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors) against ``TorchSDPABackend``; not yet run, nor tuned, on a GPU (no GPU was lent
to the session that wrote it): tile sizes, warps and stages are untuned defaults.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.layers.attention.base import AttentionBackend, AttentionMetadata
from tokenmill.layers.attention.torch_sdpa import TorchSDPABackend

BLOCK_M = 32          # query rows per prefill program
MAX_SPLITS = 16       # decode: most KV splits per sequence
SPLIT_TOKENS = 256    # decode: aim for a split per this many cached tokens


@triton.jit
def _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
              WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < WIDTH
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * WIDTH + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * WIDTH + offs, v, mask=mask)


@triton.jit
def _attend_block(q, k_cache_ptr, v_cache_ptr, block, j, kvh, lo, limit, m_i, l_i, acc,
                  scale, D: tl.constexpr, KVH: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """One step of the online softmax: the rows of ``q`` against KV block ``block`` (the
    j-th of the sequence), each row seeing positions in ``[lo, limit)`` (``lo`` > 0 under
    a sliding window); returns the updated running max, sum and accumulator. A row that
    has seen no visible key yet keeps max -inf and sum 0 (no NaN from -inf - -inf)."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    slots = block * BLOCK_SIZE + offs_n
    kv_off = (slots[:, None] * KVH + kvh) * D + offs_d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=d_mask[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    k_pos = j * BLOCK_SIZE + offs_n
    visible = (k_pos[None, :] < limit[:, None]) & (k_pos[None, :] >= lo[:, None])
    s = tl.where(visible, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off, mask=d_mask[None, :], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _prefill(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
             tile_seg_ptr, tile_start_ptr, seg_row_ptr, seg_qlen_ptr, seg_ctx_ptr,
             table_ptr, stride_table, stride_qt, stride_qh, stride_ot, stride_oh,
             scale, window, D: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             IEEE: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    row0 = tl.load(seg_row_ptr + seg)
    qlen = tl.load(seg_qlen_ptr + seg)
    ctx = tl.load(seg_ctx_ptr + seg)
    kvh = h // GROUP

    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < qlen
    q_pos = ctx + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = (row0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = ctx + tl.minimum(start + BLOCK_M, qlen) - 1  # the tile's last position
    limit = q_pos + 1  # causal: row r sees positions < q_pos[r] + 1
    lo = tl.zeros([BLOCK_M], tl.int32)  # window: and positions >= q_pos[r] + 1 - window
    first_block = 0
    if window > 0:
        lo = tl.maximum(q_pos + 1 - window, 0)
        first_block = tl.maximum(ctx + start + 1 - window, 0) // BLOCK_SIZE
    for j in range(first_block, last // BLOCK_SIZE + 1):
        block = tl.load(table_ptr + seg * stride_table + j).to(tl.int64)
        m_i, l_i, acc = _attend_block(q, k_cache_ptr, v_cache_ptr, block, j, kvh, lo, limit,
                                      m_i, l_i, acc, scale, D, KVH, BLOCK_SIZE, BLOCK_D, IEEE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_split(q_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, table_ptr, lens_ptr,
                  part_m_ptr, part_l_ptr, part_acc_ptr, stride_table, stride_qt, stride_qh,
                  scale, window, D: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr):
    i = tl.program_id(0)       # which decode
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows_ptr + i).to(tl.int64)
    seq_len = tl.load(lens_ptr + i)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    lo_pos = 0  # window: the splits share only the blocks it reaches
    if window > 0:
        lo_pos = tl.maximum(seq_len - window, 0)
    lo_block = lo_pos // BLOCK_SIZE
    per_split = tl.cdiv(num_blocks - lo_block, NUM_SPLITS)
    first = lo_block + split * per_split
    end = tl.minimum(first + per_split, num_blocks)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    limit = tl.zeros([BLOCK_H], tl.int32) + seq_len
    lo = tl.zeros([BLOCK_H], tl.int32) + lo_pos
    for j in range(first, end):
        block = tl.load(table_ptr + i * stride_table + j).to(tl.int64)
        m_i, l_i, acc = _attend_block(q, k_cache_ptr, v_cache_ptr, block, j, kvh, lo, limit,
                                      m_i, l_i, acc, scale, D, KVH, BLOCK_SIZE, BLOCK_D, IEEE)
    # partials laid out [decode, query head, split (, D)]
    part = (i * KVH * GROUP + heads) * NUM_SPLITS + split
    tl.store(part_m_ptr + part, m_i, mask=h_mask)
    tl.store(part_l_ptr + part, l_i, mask=h_mask)
    tl.store(part_acc_ptr + part[:, None] * D + offs_d[None, :], acc,
             mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge(part_m_ptr, part_l_ptr, part_acc_ptr, rows_ptr, out_ptr, stride_ot,
                  stride_oh, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    base = (i * H + h) * NUM_SPLITS
    offs_s = tl.arange(0, NUM_SPLITS)
    m = tl.load(part_m_ptr + base + offs_s)
    l_s = tl.load(part_l_ptr + base + offs_s)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.load(part_acc_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                  mask=d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] (rows may be strided, each row contiguous) into the caches."""
    t, kvh, d = k.shape
    if t == 0:
        return
    width = kvh * d
    _store_kv[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                    WIDTH=width, BLOCK=triton.next_power_of_2(width))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      out: torch.Tensor, meta: AttentionMetadata, scale: float,
                      window: int | None = None) -> None:
    """Attention of every prefill segment of the step, written into ``out`` rows (each
    query sees only the last ``window`` positions where a window is given)."""
    segs = meta.prefills
    tile_seg, tile_start = [], []
    for i, seg in enumerate(segs):
        for start in range(0, seg.query_len, BLOCK_M):
            tile_seg.append(i)
            tile_start.append(start)
    dev = q.device

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=dev)

    table = meta.prefill_seg_table.to(device=dev, dtype=torch.int32)
    num_heads, d = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    _prefill[(len(tile_seg), num_heads)](
        q, k_cache, v_cache, out, ints(tile_seg), ints(tile_start),
        ints([s.start for s in segs]), ints([s.query_len for s in segs]),
        ints([s.context_len for s in segs]), table, table.stride(0), q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), scale, window or 0, D=d, KVH=kvh,
        GROUP=num_heads // kvh, BLOCK_SIZE=meta.block_size, BLOCK_M=BLOCK_M,
        BLOCK_D=_pow2(d), IEEE=q.dtype == torch.float32)


def num_splits(max_len: int) -> int:
    """KV splits per decode: about one per SPLIT_TOKENS cached tokens, a power of two."""
    want = max(1, -(-max_len // SPLIT_TOKENS))
    return min(MAX_SPLITS, triton.next_power_of_2(want))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, meta: AttentionMetadata, scale: float,
                     splits: int | None = None, window: int | None = None) -> None:
    """One query per decode row (``meta.decode_rows``), split-K over its context."""
    n = meta.num_decodes
    num_heads, d = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    group = num_heads // kvh
    dev = q.device
    if splits is None:
        splits = num_splits(int(meta.decode_seq_lens.max()))
    rows = meta.decode_rows.to(device=dev, dtype=torch.int32)
    table = meta.decode_block_table.to(device=dev, dtype=torch.int32)
    lens = meta.decode_seq_lens.to(device=dev, dtype=torch.int32)
    part_m = torch.empty(n, num_heads, splits, dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(n, num_heads, splits, d, dtype=torch.float32, device=dev)
    _decode_split[(n, kvh, splits)](
        q, k_cache, v_cache, rows, table, lens, part_m, part_l, part_acc,
        max(table.stride(0), 1), q.stride(0), q.stride(1), scale, window or 0, D=d, KVH=kvh,
        GROUP=group, BLOCK_SIZE=meta.block_size, BLOCK_H=_pow2(group), BLOCK_D=_pow2(d),
        NUM_SPLITS=splits, IEEE=q.dtype == torch.float32)
    _decode_merge[(n, num_heads)](part_m, part_l, part_acc, rows, out, out.stride(0),
                                  out.stride(1), H=num_heads, D=d, BLOCK_D=_pow2(d),
                                  NUM_SPLITS=splits)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on the GPU: the kernels above, one launch each per layer."""

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
        if softcap is not None:  # not in these kernels: the reference computes it
            return TorchSDPABackend().forward(q, k, v, k_cache, v_cache, meta, scale,
                                              window, softcap)
        if meta.block_size < 16:  # tl.dot needs 16 keys per tile on the GPU
            raise ValueError(f"the Triton attention backend needs block_size >= 16, got "
                             f"{meta.block_size}.")
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.prefills:
            prefill_attention(q, k_cache, v_cache, out, meta, scale, window)
        if meta.num_decodes:
            decode_attention(q, k_cache, v_cache, out, meta, scale, window=window)
        return out
