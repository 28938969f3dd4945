"""The GGUF block types read as stored (Q5_0, Q5_1, IQ4_NL, Q2_K..Q6_K, IQ4_XS): the C
kernels against gguf-py's dequantization times the activations rounded as the kernels
round them; batch invariance; the float32 rows of embedding lookups; fused projections
whose parts come in different types; the portable C build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

from tests.kernels.quant_blocks import FP16_FIELDS, Q, gguf_dense, random_blocks
from tokenmill.kernels import cpu
from tokenmill.kernels.cpu import kernels
from tokenmill.layers.linear import QKVParallelLinear
from tokenmill.layers.quantization import (
    BLOCK_WEIGHTS,
    PACKED_BLOCK_BYTES,
    REGROUPED,
    PackedRows,
    PackedWeight,
    QuantizedTensor,
    pack_parts,
    packed_linear,
)

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the CPU kernels")

TYPES = [q for q in FP16_FIELDS if q != Q.Q8_0]
IDS = [q.name for q in TYPES]


def k_for(qtype: Q, blocks_of_32: int) -> int:
    """A width of about ``blocks_of_32`` blocks, whole blocks of the type."""
    per = BLOCK_WEIGHTS[int(qtype)] // 32
    return max(1, blocks_of_32 // per) * per * 32


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same sums in another float32 order: errors of a few ulps of the largest terms."""
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * scale)


def test_tables_agree_with_gguf_py():
    for q, (block, bb) in GGML_QUANT_SIZES.items():
        if int(q) in PACKED_BLOCK_BYTES:
            assert (BLOCK_WEIGHTS[int(q)], PACKED_BLOCK_BYTES[int(q)]) == (block, bb), q.name


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_matmul_every_row_count(qtype):
    """Rows 1..64, 100 and 513 against the reference; each count's rows are bit-identical
    to the same rows in the 513-row batch (tiles of 4 and the remainder sum alike). 37
    output rows (not a multiple of 16); K with a partial group of 8 blocks of 32 where the
    type has blocks of 32 (K = 224), three super-blocks for the K-quants (K = 768)."""
    k = 224 if BLOCK_WEIGHTS[int(qtype)] == 32 else 768
    t = random_blocks(qtype, 37, k, seed=int(qtype))
    w = PackedWeight.of(t)
    assert w.data.data_ptr() == t.data.data_ptr()  # read in place, no copy
    x = torch.randn(513, k, generator=torch.Generator().manual_seed(1))
    x[3] *= 1e-3  # rows of very different scales
    x[4, :32] = 0.0  # an all-zero activation block
    full = packed_linear(x, w)
    assert_matches(full, F.linear(kernels().round_activations(x), gguf_dense(t)))
    for m in [*range(1, 65), 100]:
        assert torch.equal(packed_linear(x[:m], w), full[:m]), m
    for i in (0, 3, 4, 77, 512):
        assert torch.equal(packed_linear(x[i:i + 1], w)[0], full[i])


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@pytest.mark.parametrize("n", [16, 64, 5, 100])
def test_matmul_shapes(qtype, n):
    k = k_for(qtype, 40)
    t = random_blocks(qtype, n, k, seed=n)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(n)) * 3
    bias = torch.randn(n)
    got = packed_linear(x, PackedWeight.of(t), bias)
    assert_matches(got, F.linear(kernels().round_activations(x), gguf_dense(t), bias))
    # rounding the activations costs little against exact float32
    exact = F.linear(x, gguf_dense(t), bias)
    assert (got - exact).norm() / exact.norm() < 2e-2


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_extreme_blocks_do_not_overflow(qtype):
    """Every byte 0x00, 0xFF or 0x80 (largest integers, scales and mins) against activation
    blocks at +-127: the 16-bit pair sums and 32-bit sums must not saturate."""
    k = k_for(qtype, 8)
    block, bb = GGML_QUANT_SIZES[qtype]
    rows = []
    for fill in (0x00, 0xFF, 0x80, 0x7F):
        data = torch.full((k // block, bb), fill, dtype=torch.uint8)
        for at, _, hi in FP16_FIELDS[qtype]:
            data[:, at:at + 2] = torch.tensor([hi], dtype=torch.float16).view(torch.uint8)
        rows.append(data.view(1, -1))
    t = QuantizedTensor(int(qtype), torch.cat(rows), (4, k))
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    got = packed_linear(x, PackedWeight.of(t))
    assert_matches(got, F.linear(kernels().round_activations(x), gguf_dense(t)))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_dequant_is_gguf_py_bit_for_bit(qtype):
    k = k_for(qtype, 24)
    t = random_blocks(qtype, 21, k, seed=3)
    w = PackedWeight.of(t)
    want = gguf_dense(t)
    assert torch.equal(w.dequantize(), want)
    ids = torch.tensor([[20, 0], [7, 7]])
    assert torch.equal(w.rows(ids), want[ids])  # an embedding lookup
    with pytest.raises(IndexError):
        w.rows(torch.tensor([21]))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_our_torch_dequantizer_agrees(qtype):
    """The loader's dequantizer (``--quantization none``) and the kernels' decode."""
    k = k_for(qtype, 16)
    t = random_blocks(qtype, 6, k, seed=9)
    assert torch.equal(t.dequantize(), gguf_dense(t))


def test_fused_projection_of_three_types():
    """A q/k/v projection with q in Q5_0, k in Q6_K and v in Q8_0: three row ranges used in
    place (Q8_0 regrouped), multiplied in one call; a row alone equals the row in a batch."""
    layer = QKVParallelLinear(512, 32, num_heads=4, num_kv_heads=2)
    q, k, v = (random_blocks(Q.Q5_0, 128, 512, seed=1), random_blocks(Q.Q6_K, 64, 512, seed=2),
               _q8_0(64, 512, seed=3))
    layer.weight_loader(layer.weight, v, "v")
    layer.weight_loader(layer.weight, q, "q")
    with pytest.raises(RuntimeError, match="before all its rows"):
        layer(torch.randn(1, 512))
    layer.weight_loader(layer.weight, k, "k")
    assert isinstance(layer.packed, PackedRows) and layer.packed.qtypes == (6, 14, 8)
    assert layer.packed.parts[0].data.data_ptr() == q.data.data_ptr()
    want_w = torch.cat([gguf_dense(q), gguf_dense(k), gguf_dense(v)])
    assert torch.equal(layer.packed.dequantize(), want_w)
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(4))
    got = layer(x)
    assert_matches(got, F.linear(kernels().round_activations(x), want_w))
    for i in range(7):
        assert torch.equal(layer(x[i:i + 1])[0], got[i])


def _q8_0(rows: int, cols: int, seed: int) -> QuantizedTensor:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = torch.from_numpy(gguf_quants.quantize(x, Q.Q8_0))
    return QuantizedTensor(int(Q.Q8_0), raw.view(rows, -1), (rows, cols))


def test_pack_parts_checks_coverage():
    a, b = random_blocks(Q.Q4_K, 8, 256), random_blocks(Q.Q4_K, 8, 256, seed=1)
    with pytest.raises(ValueError, match="overlap or leave rows out"):
        pack_parts([(0, a), (4, b)], (16, 256))
    with pytest.raises(ValueError, match="cover 8 of the 16 rows"):
        pack_parts([(0, a)], (16, 256))
    same = pack_parts([(8, b), (0, a)], (16, 256))
    assert isinstance(same, PackedRows) and same.qtypes == (12, 12)  # in place, not copied
    assert torch.equal(same.dequantize(), torch.cat([gguf_dense(a), gguf_dense(b)]))
    assert REGROUPED == {2, 3, 8}


def test_k_quant_column_shard_is_whole_super_blocks():
    t = random_blocks(Q.Q4_K, 4, 768)
    assert torch.equal(gguf_dense(t.narrow(1, 256, 512)), gguf_dense(t)[:, 256:])
    with pytest.raises(ValueError, match="whole blocks of 256"):
        t.narrow(1, 32, 256)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_builds_agree(tmp_path, monkeypatch, isa):
    """The build held to AVX2 (what AVX-512 and AVX-VNNI CPUs run for these types) and the
    portable C build (no AVX2), each against the reference, each batch-invariant."""
    if isa == "avx2" and not kernels().has_avx2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    flags = cpu._ISA_FLAGS["avx2"] if isa == "avx2" else (
        "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f", "-mno-avxvnni")
    lib = cpu.build_kernels(flags)
    assert lib.has_avx2 == (isa == "avx2") and not lib.has_vnni
    x = torch.randn(6, 768, generator=torch.Generator().manual_seed(5))
    for qtype in TYPES:
        t = random_blocks(qtype, 19, 768, seed=int(qtype))
        w = PackedWeight.of(t)
        tm = w.tm_weight()
        got = lib.gemm_weight(tm, x)
        assert_matches(got, F.linear(lib.round_activations(x), gguf_dense(t)))
        for i in range(6):
            assert torch.equal(lib.gemm_weight(tm, x[i:i + 1].contiguous())[0], got[i])
        assert torch.equal(lib.dequant(int(qtype), t.data, 19, 768), gguf_dense(t))
