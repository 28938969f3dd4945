"""The C decode-attention kernel against the SDPA reference backend, over random paged
layouts: GQA groups, lengths on and off block boundaries, shuffled block tables."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu import kernels
from tokenmill.layers.attention import (
    AttentionMetadata,
    CPUAttentionBackend,
    PrefillSegment,
    TorchSDPABackend,
)

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the CPU kernels")


def decode_metadata(lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator):
    """Each sequence gets distinct random blocks; the table is padded with block 0."""
    max_blocks = -(-max(lens) // block_size)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        table[i, :nb] = perm[used: used + nb]
        used += nb
    width = max_blocks * block_size
    lens_t = torch.tensor(lens)
    mask = (torch.arange(width)[None] < lens_t[:, None]).view(len(lens), 1, 1, width)
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), prefills=[],
        decode_rows=torch.arange(len(lens)), decode_block_table=table, decode_mask=mask,
        decode_seq_lens=lens_t, num_decodes=len(lens), block_size=block_size)


# head sizes: 64 and 128 take the AVX-512 path where the CPU has it, 24 the AVX2 one,
# 20 the portable one; 32 whichever is widest
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [32, 64, 128, 24, 20])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_kernel_matches_sdpa(heads, kv_heads, block_size, d, cache_dtype):
    """float16 caches: the kernel converts what it reads; the reference gets the same
    rounded values in float32."""
    gen = torch.Generator().manual_seed(heads * 100 + block_size + d)
    lens = [1, block_size, block_size + 1, 15, 16, 17, 37, 64, 203]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=gen).to(cache_dtype)
    q = torch.randn(len(lens), heads, d, generator=gen)
    meta = decode_metadata(lens, block_size, num_blocks, gen)
    want = TorchSDPABackend().decode(q, k_cache, v_cache, meta, 0.125)
    got = CPUAttentionBackend(kernels()).decode(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "cpu"])
def test_float16_cache_prefill_reads_what_decodes_will(backend):
    """A prompt's K/V go into a float16 cache rounded; its own prefill attends to the
    rounded values, as the later decodes do: the same result as a float32 cache that was
    handed the rounded values to begin with."""
    gen = torch.Generator().manual_seed(7)
    n, heads, kv_heads, d, bs = 21, 6, 2, 64, 4
    q = torch.randn(n, heads, d, generator=gen)
    k = torch.randn(n, kv_heads, d, generator=gen).half().float()
    v = torch.randn(n, kv_heads, d, generator=gen).half().float()
    table = torch.arange(8).view(1, 8)  # identity blocks: slot = position
    slots = torch.arange(n)
    meta = AttentionMetadata(
        slot_mapping=slots, prefills=[PrefillSegment(0, n, 0, None, None)],
        decode_rows=torch.empty(0, dtype=torch.long),
        decode_block_table=torch.empty(0, 1, dtype=torch.long),
        decode_mask=torch.empty(0, 1, 1, 1, dtype=torch.bool),
        decode_seq_lens=torch.empty(0, dtype=torch.long), num_decodes=0, block_size=bs,
        prefill_seg_table=table, prefill_rows=torch.arange(n),
        prefill_row_seg=torch.zeros(n, dtype=torch.long),
        prefill_seq_lens=torch.arange(1, n + 1))
    impl = TorchSDPABackend() if backend == "sdpa" else CPUAttentionBackend(kernels())
    outs = []
    for dtype in (torch.float32, torch.float16):
        kc = torch.zeros(32, kv_heads, d, dtype=dtype)
        vc = torch.zeros(32, kv_heads, d, dtype=dtype)
        outs.append(impl.forward(q, k, v, kc, vc, meta, 0.125))
        assert torch.equal(kc[:n].float(), k) and torch.equal(vc[:n].float(), v)
    assert torch.equal(outs[0], outs[1])
