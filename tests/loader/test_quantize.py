"""Quantizing float weights into GGUF blocks (``tokenmill.gguf.quantize``) and which
tensors ``--quantization`` picks (``tokenmill.loader.quantize_at_load``)."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from tokenmill.gguf import quantize as qmod
from tokenmill.gguf.quant_types import QuantizedTensor
from tokenmill.gguf.quantize import Q4_0, Q4_K, Q5_0, Q8_0, quantize
from tokenmill.loader.quantize_at_load import QuantizeAtLoad

# relative RMS error |deq(q(x)) - x| / |x| of Gaussian weights: measured (Q8_0 0.0054,
# Q4_0 0.086, Q5_0 0.043, Q4_K 0.072), bounded a little above
BOUND = {Q8_0: 0.007, Q4_0: 0.10, Q5_0: 0.05, Q4_K: 0.08}


def gguf_py_dequantize(t: QuantizedTensor) -> torch.Tensor:
    """gguf-py's dequantization (the reference, independent of our torch one)."""
    values = gguf.quants.dequantize(t.data.numpy(), GGMLQuantizationType(t.qtype))
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(t.shape)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q5_0, Q4_K])
def test_blocks_dequantize_within_the_expected_error(qtype):
    w = gaussian(64, 512)
    t = quantize(w, qtype)
    assert t.shape == (64, 512) and t.data.dtype == torch.uint8
    deq = gguf_py_dequantize(t)
    assert torch.equal(deq, t.dequantize())  # our dequantization reads the same blocks
    err = ((deq - w).norm() / w.norm()).item()
    assert err < BOUND[qtype]
    assert err > BOUND[qtype] / 4  # it is a 4/5/8-bit format, not a copy


def test_q4_k_beats_q4_0_and_comes_near_llama_cpps_full_search():
    w = gaussian(128, 1024, seed=1)
    err = {q: ((quantize(w, q).dequantize() - w).norm() / w.norm()).item()
           for q in (Q4_0, Q4_K)}
    assert err[Q4_K] < 0.9 * err[Q4_0]
    sub = w.view(-1, 32)
    weights = sub.pow(2).mean(-1, keepdim=True).sqrt() + sub.abs()

    def search_error(search):
        scale, neg_min, levels = qmod.make_qkx2_quants(sub, weights, nmax=15, **search)
        deq = scale.unsqueeze(-1) * levels.float() - neg_min.unsqueeze(-1)
        return ((deq - sub).norm() / sub.norm()).item()

    ours, full = search_error(qmod.Q4_K_SEARCH), search_error(qmod.LLAMA_CPP_Q4_K_SEARCH)
    assert full <= ours < 1.02 * full  # the shorter search costs under 2% more error


def test_q4_k_special_blocks():
    w = torch.zeros(2, 512)
    w[0, :256] = 0.5      # constant positive super-block
    w[0, 256:] = -0.25    # constant negative one (the min carries it)
    w[1, :32] = torch.linspace(-1, 1, 32)  # one live sub-block among zeros
    w[1, 256:] = torch.linspace(0, 3, 256)  # all positive: min pinned to 0
    deq = gguf_py_dequantize(quantize(w, Q4_K))
    assert torch.isfinite(deq).all()
    assert (deq - w).abs().max().item() < 0.11
    assert deq[1, 32:256].abs().max().item() == 0.0


def test_quantize_bf16_and_refusals():
    w = gaussian(4, 64).to(torch.bfloat16)
    assert torch.allclose(quantize(w, Q8_0).dequantize(), w.float(), atol=0.02)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        quantize(gaussian(4, 64), Q4_K)
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize(gaussian(4, 64), 3)


def test_plan_picks_linear_weights_and_the_head():
    plan = QuantizeAtLoad("q4_k", tie_word_embeddings=False)
    layer = "model.layers.0."
    assert plan.qtype_for(layer + "self_attn.q_proj.weight", (256, 256)) == Q4_K
    assert plan.qtype_for(layer + "mlp.down_proj.weight", (64, 896)) == Q5_0  # 896 % 256
    assert plan.qtype_for(layer + "mlp.down_proj.weight", (64, 100)) is None  # 100 % 32
    assert plan.qtype_for("lm_head.weight", (512, 256)) == Q8_0
    assert plan.qtype_for("model.embed_tokens.weight", (512, 256)) is None
    assert plan.qtype_for(layer + "input_layernorm.weight", (256,)) is None
    assert plan.qtype_for(layer + "self_attn.q_proj.bias", (256,)) is None
    tied = QuantizeAtLoad("q4_0", tie_word_embeddings=True)
    assert tied.qtype_for("model.embed_tokens.weight", (512, 256)) == Q8_0
    assert tied.qtype_for(layer + "mlp.up_proj.weight", (128, 64)) == Q4_0
    with pytest.raises(ValueError, match="q8_0, q4_0, q4_k"):
        QuantizeAtLoad("q2_k", tie_word_embeddings=False)


def test_apply_quantizes_one_tensor_at_a_time():
    plan = QuantizeAtLoad("q8_0", tie_word_embeddings=False)
    w, norm = gaussian(8, 64), torch.ones(64)
    out = dict(plan.apply(iter([("model.layers.0.mlp.up_proj.weight", w),
                                ("model.norm.weight", norm)])))
    assert isinstance(out["model.layers.0.mlp.up_proj.weight"], QuantizedTensor)
    assert out["model.norm.weight"] is norm
