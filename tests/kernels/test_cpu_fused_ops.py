"""The fused element-wise C ops (RMSNorm + residual, rotary, SiLU-and-mul) against the
torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.config import RopeConfig
from tokenmill.kernels.cpu import fused_kernels, kernels
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the CPU kernels")


@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm_with_and_without_residual(rows):
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data.copy_(torch.randn(96))
    x, res = torch.randn(rows, 96), torch.randn(rows, 96)
    ref_alone = norm._norm(x)
    ref_out, ref_res = norm._norm(x + res), x + res
    torch.testing.assert_close(norm(x), ref_alone, rtol=1e-5, atol=1e-5)
    out, new_res = norm(x, res.clone())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_res, ref_res)


def test_rotary_in_place_on_fused_qkv():
    heads, kv_heads, d, t = 6, 2, 16, 5
    rope = RotaryEmbedding(d, 64, RopeConfig(theta=10000.0))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d)
    positions = torch.tensor([0, 3, 4, 17, 63])
    q, k, v = qkv.clone().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    ref_q, ref_k = rope(positions, q.reshape(t, heads, d), k.reshape(t, kv_heads, d))
    assert rope.rotate_fused_(positions, qkv, heads, kv_heads)
    got_q, got_k, got_v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    torch.testing.assert_close(got_q.reshape(t, heads, d), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k.reshape(t, kv_heads, d), ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_v, v)  # v untouched


def test_silu_and_mul():
    """Width 43: the 16-wide, 8-wide and scalar loops; gates far out on both sides."""
    x = torch.randn(3, 2 * 43) * 4
    x[0, :6] = torch.tensor([-200.0, -88.5, -87.0, 0.0, 88.5, 200.0])
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels().silu_and_mul(x), F.silu(gate) * up,
                               rtol=1e-5, atol=1e-6)


def test_fused_ops_refuse_unsuitable_tensors():
    assert fused_kernels(torch.randn(2, 4)) is not None
    assert fused_kernels(torch.randn(2, 4, dtype=torch.bfloat16)) is None
    assert fused_kernels(torch.randn(4, 2).t()) is None  # not contiguous
    assert fused_kernels(torch.randn(2, 2, 2)) is None


@pytest.mark.parametrize("vocab,width", [(1000, 1000), (1000, 1024), (49152, 49152)])
def test_token_bitmask_kernel_matches_xgrammar(vocab, width):
    """Structured outputs' mask: same -inf entries as xgrammar's own CPU implementation,
    only on the listed rows, padding columns beyond the vocabulary untouched."""
    xgr = pytest.importorskip("xgrammar")
    g = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, -(-vocab // 32)), dtype=torch.int32,
                            generator=g)
    bitmask[2, ::3] = -1  # words with every token allowed
    bitmask[4] = 0         # a row with nothing allowed
    logits = torch.randn(6, width, generator=g)
    want, got = logits.clone(), logits.clone()
    rows = [0, 2, 4, 5]
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=rows)
    kernels().apply_token_bitmask(got, bitmask, torch.tensor(rows), vocab)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3]], logits[[1, 3]])
    assert torch.isneginf(got[4, :vocab]).all()
