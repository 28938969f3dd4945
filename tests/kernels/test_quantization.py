"""Packed GGUF weights: the C kernels against the torch dequantizer + F.linear, and the
layers that hold packed blocks (fused parts, tensor-parallel column shards, fallback)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from tokenmill.gguf.dequant import dequantize
from tokenmill.kernels import cpu
from tokenmill.kernels.cpu import kernels
from tokenmill.layers import quantization
from tokenmill.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from tokenmill.layers.quantization import (
    PACKED_BLOCK_BYTES,
    PackedWeight,
    QuantizedTensor,
    packed_linear,
)

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the CPU kernels")


def random_blocks(qtype: int, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """Random quantized rows with sane fp16 scales (and mins for Q4_1)."""
    g = torch.Generator().manual_seed(seed)
    bb = PACKED_BLOCK_BYTES[qtype]
    data = torch.randint(0, 256, (rows, cols // 32, bb), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, cols // 32, generator=g) * 0.05 + 0.001).half()
    data[..., 0:2] = scales.view(torch.uint8).view(rows, cols // 32, 2)
    if qtype == 3:  # Q4_1's min
        mins = (torch.rand(rows, cols // 32, generator=g) * -0.4).half()
        data[..., 2:4] = mins.view(torch.uint8).view(rows, cols // 32, 2)
    return QuantizedTensor(qtype, data.view(rows, -1), (rows, cols))


def dense(t: QuantizedTensor) -> torch.Tensor:
    return dequantize(t.data.reshape(-1), GGMLQuantizationType(t.qtype), t.shape)


def packed(t: QuantizedTensor) -> PackedWeight:
    w = PackedWeight(t.qtype, *t.shape)
    w.copy_rows(0, t)
    return w


# Output widths: 67 rows keep the row layout everywhere; 64 rows are interleaved in groups
# of 16 where the CPU has AVX-512 VNNI (the other kernel).
WIDTHS = [67, 64]


@pytest.mark.parametrize("qtype", [2, 3, 8])
@pytest.mark.parametrize("n", [37, 48])
def test_dequant_kernel_is_bit_exact(qtype, n):
    t = random_blocks(qtype, n, 96)
    assert torch.equal(packed(t).dequantize(), dense(t))


@pytest.mark.parametrize("qtype", [2, 3, 8])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 64, 65, 130])
def test_packed_linear_matches_dense(qtype, n, rows):
    """Exact weights times activations rounded per block: the float32 reference is the
    dequantized matrix times the rounded activations."""
    t = random_blocks(qtype, n, 160, seed=rows)
    w = PackedWeight(qtype, n, 160)
    w.copy_rows(0, t)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    got = packed_linear(x, w, bias)
    want = F.linear(kernels().round_activations(x), dense(t), bias)
    # outputs reach ~50; float32 sums in another order differ by ~1e-5 absolute
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and rounding the activations costs well under 1% against exact float32
    exact = F.linear(x, dense(t), bias)
    assert (got - exact).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("qtype", [2, 3, 8])
@pytest.mark.parametrize("n", [33, 32])
def test_rows_do_not_depend_on_the_batch(qtype, n):
    """In the kernel, row i of a batch is bit-identical to row i computed alone (tiles of
    4 and the remainder rows sum in the same order)."""
    t = random_blocks(qtype, n, 96, seed=5)
    w = PackedWeight(qtype, n, 96)
    w.copy_rows(0, t)
    x = torch.randn(11, 96, generator=torch.Generator().manual_seed(2))
    together = packed_linear(x, w)
    for i in range(11):
        assert torch.equal(packed_linear(x[i: i + 1], w)[0], together[i])


def test_activation_rounding():
    x = torch.randn(3, 64) * torch.logspace(-3, 3, 64)
    r = kernels().round_activations(x)
    blocks, rb = x.view(-1, 32), r.view(-1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    assert ((rb - blocks).abs() <= step / 2 + 1e-6 * step).all()
    assert torch.equal(kernels().round_activations(torch.zeros(1, 32)), torch.zeros(1, 32))


def test_activation_rounding_is_exactly_the_reference():
    """The kernels' rounding (16-, 8-wide or scalar, whichever the build has) against the
    same float32 operations in torch: d = amax / 127, q = round-half-even(x * (127 / amax)),
    value d * q; bit for bit, ties and zero blocks included."""
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(6)) * torch.logspace(-4, 4, 256)
    x[0, :32] = 0.0
    x[1, 0], x[1, 1:32] = 127.0, torch.arange(31) - 14.5  # scale 1: every value a .5 tie
    blocks = x.view(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    want = (amax / 127.0) * torch.round(blocks * inv)
    assert torch.equal(kernels().round_activations(x).view(-1, 32), want)


def test_packed_linear_keeps_leading_dims_and_dtype():
    t = random_blocks(3, 8, 64)
    w = PackedWeight(3, 8, 64)
    w.copy_rows(0, t)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = packed_linear(x, w)
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16
    want = F.linear(kernels().round_activations(x.float().view(-1, 64)).view(2, 3, 64), dense(t))
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", [2, 3, 8])
@pytest.mark.parametrize("n", [50, 48])
def test_embedding_rows(qtype, n):
    t = random_blocks(qtype, n, 64)
    w = PackedWeight(qtype, n, 64)
    w.copy_rows(0, t)
    ids = torch.tensor([[3, 0], [n - 1, 3]])
    assert torch.equal(w.rows(ids), dense(t)[ids])
    with pytest.raises(IndexError):
        w.rows(torch.tensor([n]))


def test_a_matrix_is_used_only_once_every_row_arrived():
    a, b = random_blocks(3, 16, 64, seed=1), random_blocks(3, 16, 64, seed=2)
    w = PackedWeight(3, 32, 64)
    w.copy_rows(16, b)
    with pytest.raises(RuntimeError, match="before all its rows"):
        packed_linear(torch.randn(1, 64), w)
    assert torch.equal(w.dequantize()[16:], dense(b))  # the row layout, read in Python
    w.copy_rows(0, a)
    assert w.complete and torch.equal(w.dequantize(), torch.cat([dense(a), dense(b)]))
    with pytest.raises(RuntimeError, match="already copied"):
        w.copy_rows(0, a)


@pytest.mark.parametrize("sizes", [[16, 24], [16, 32]])
def test_fused_parts_stay_packed(sizes):
    layer = MergedColumnParallelLinear(64, sizes)
    a, b = random_blocks(3, sizes[0], 64, seed=1), random_blocks(3, sizes[1], 64, seed=2)
    layer.weight_loader(layer.weight, b, 1)
    layer.weight_loader(layer.weight, a, 0)
    assert layer.packed is not None and layer.packed.qtype == 3
    x = torch.randn(3, 64)
    want = F.linear(kernels().round_activations(x), torch.cat([dense(a), dense(b)]))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_fused_parts_of_mixed_types_stay_packed_as_row_ranges():
    """q/k in one type and v in another (as Q4_K_M files store them): each part kept in
    its own type, multiplied in one call."""
    layer = MergedColumnParallelLinear(64, [16, 24])
    a, b = random_blocks(3, 16, 64, seed=1), random_blocks(8, 24, 64, seed=2)
    layer.weight_loader(layer.weight, a, 0)
    with pytest.raises(RuntimeError, match="before all its rows"):
        layer(torch.randn(1, 64))
    layer.weight_loader(layer.weight, b, 1)
    assert isinstance(layer.packed, quantization.PackedRows)
    assert layer.packed.qtypes == (3, 8)
    assert torch.equal(layer.packed.dequantize(), torch.cat([dense(a), dense(b)]))
    x = torch.randn(5, 64)
    want = F.linear(kernels().round_activations(x), torch.cat([dense(a), dense(b)]))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_fused_parts_with_a_float_part_fall_back_to_dense():
    layer = MergedColumnParallelLinear(64, [16, 24])
    a = random_blocks(3, 16, 64, seed=1)
    b = dense(random_blocks(8, 24, 64, seed=2))
    layer.weight_loader(layer.weight, a, 0)
    layer.weight_loader(layer.weight, b, 1)
    assert layer.packed is None
    assert torch.equal(layer.weight, torch.cat([dense(a), b]))


def test_column_shard_of_blocks():
    t = random_blocks(8, 4, 128)
    shard = t.narrow(1, 32, 64)
    assert torch.equal(dense(shard), dense(t)[:, 32:96])
    with pytest.raises(ValueError, match="whole blocks"):
        t.narrow(1, 16, 32)


def test_without_kernels_weights_load_dense(monkeypatch):
    monkeypatch.setattr(quantization, "kernels", lambda: None)
    layer = ReplicatedLinear(64, 8, bias=False)
    t = random_blocks(3, 8, 64)
    layer.weight_loader(layer.weight, t)
    assert layer.packed is None and torch.equal(layer.weight, dense(t))


@pytest.mark.parametrize("isa", ["avx2", "avxvnni"])
def test_narrower_builds_agree_with_the_default_one(tmp_path, monkeypatch, isa):
    """On an AVX-512 VNNI CPU the default build multiplies interleaved groups of 16 rows
    with 512-bit dot products; a build held to AVX2 keeps the row layout and its own
    kernel; one held to AVX-VNNI (where the CPU has it) interleaves and uses 256-bit dot
    products. Each against the same reference (and so against each other)."""
    k = kernels()
    if not k.has_avx2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    avx2 = cpu.build_kernels(cpu._ISA_FLAGS[isa])
    assert avx2.has_avx2 and not avx2.has_vnni
    if isa == "avxvnni" and not avx2.has_avx_vnni:
        pytest.skip("no AVX-VNNI on this CPU")
    assert avx2.interleaved(64) == (isa == "avxvnni")
    # activations are rounded by 16-wide code on AVX-512, by a scalar loop otherwise:
    # the same bytes and scales (ties, zeros and a wide range included)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(4)) * torch.logspace(-4, 4, 256)
    x[0, :32] = 0.0
    x[1, 0], x[1, 1:32] = 127.0, torch.arange(31) - 14.5  # scale 1: every value a .5 tie
    assert torch.equal(k.round_activations(x), avx2.round_activations(x))
    for qtype in (2, 3, 8):
        t = random_blocks(qtype, 64, 160, seed=qtype)
        x = torch.randn(7, 160, generator=torch.Generator().manual_seed(3))
        want = F.linear(k.round_activations(x), dense(t))
        outs = []
        for lib in (k, avx2):
            w = quantization.regroup_rows(qtype, t.data)
            lib.pack_layout(qtype, w, 64, 160)
            assert torch.equal(lib.dequant(qtype, w, 64, 160), dense(t))
            outs.append(lib.gemm(qtype, x, w, 64))
            torch.testing.assert_close(outs[-1], want, rtol=1e-5, atol=1e-4)
            for i in range(7):  # each build: a row alone is the row in the batch
                assert torch.equal(lib.gemm(qtype, x[i:i + 1].contiguous(), w, 64)[0],
                                   outs[-1][i])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-4)
