"""The whole-step C decode path (``CPUDecodePath``, ``tm_decode_layers``) on a tiny random
Qwen2 GGUF: q/k/v biases, an untied output head, and the types of a Q4_K_M file (Q4_K,
Q6_K, Q5_0, Q8_0; fused q/k/v and gate/up of mixed types). Its logprobs must equal, bit
for bit, those of the Python layer code running the same kernels."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.kernels.quant_blocks import random_blocks
from tests.loader.test_loader_gguf import GGUF_NAMES, HF_SHAPES, write_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import kernels
from tokenmill.models.cpu_decode import CPUDecodePath

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the CPU kernels")

LAYERS = 2
# per layer: the types llama.cpp's Q4_K_M mix uses for Qwen2.5 (alternating where it does)
LAYER_TYPES = [
    {"q_proj": Q.Q5_0, "k_proj": Q.Q5_0, "v_proj": Q.Q8_0, "o_proj": Q.Q4_K,
     "gate_proj": Q.Q4_K, "up_proj": Q.Q5_0, "down_proj": Q.Q6_K},
    {"q_proj": Q.Q4_K, "k_proj": Q.Q4_K, "v_proj": Q.Q6_K, "o_proj": Q.Q5_0,
     "gate_proj": Q.Q5_0, "up_proj": Q.Q5_0, "down_proj": Q.Q4_K},
]
OUTER_TYPES = {"model.embed_tokens.weight": Q.Q5_0, "lm_head.weight": Q.Q6_K}


def _tiny_qwen2(tmp_path, bias_scale: float) -> str:
    rng = np.random.default_rng(0)
    tensors = {}
    seed = 0
    for hf, shape in HF_SHAPES.items():
        for layer in range(LAYERS) if hf.startswith("model.layers.0.") else [None]:
            name, gguf = hf, GGUF_NAMES[hf]
            if layer is not None:
                name = hf.replace(".0.", f".{layer}.", 1)
                gguf = gguf.replace(".0.", f".{layer}.", 1)
            proj = hf.split(".")[-2]
            qtype = OUTER_TYPES.get(name) or (LAYER_TYPES[layer].get(proj) if layer is not None
                                              else None)
            if qtype is not None:
                seed += 1
                tensors[gguf] = (random_blocks(qtype, *shape, seed=seed).data.numpy(), qtype)
            else:  # norms: around 1
                tensors[gguf] = ((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32),
                                 Q.F32)
    for layer in range(LAYERS):
        for part in "qkv":
            rows = HF_SHAPES[f"model.layers.0.self_attn.{part}_proj.weight"][0]
            tensors[f"blk.{layer}.attn_{part}.bias"] = (
                (bias_scale * rng.standard_normal(rows)).astype(np.float32), Q.F32)
    return write_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", tensors,
                      {"qwen2.block_count": LAYERS})


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[i] for i in ids]


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_qwen2_with_biases_takes_the_c_path_bit_identically(tmp_path, kv_dtype):
    if kv_dtype == "float16" and not kernels().has_avx2:
        pytest.skip("the C path writes a float16 cache only with F16C (AVX2 builds)")
    path = _tiny_qwen2(tmp_path, bias_scale=0.5)
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="8MiB",
              kv_cache_dtype=kv_dtype, show_progress=False)
    model = llm.engine.runner.model
    assert model.config.qkv_bias and not model.config.tie_word_embeddings
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    prompts = [[1, 5, 9, 30, 2, 7], [3], [4, 4, 4, 4, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                         21, 22, 23]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)
    fast = _run(llm, prompts, params)  # three decodes per step: T = 3 rows in C
    assert isinstance(model._decode_path, CPUDecodePath), "qwen2 should take the C path"
    model._decode_path = False
    try:
        slow = _run(llm, prompts, params)
    finally:
        model._decode_path = None
    for f, s in zip(fast, slow, strict=True):
        assert f.token_ids == s.token_ids
        for lf, ls in zip(f.logprobs, s.logprobs, strict=True):
            assert {t: e.logprob for t, e in lf.items()} == {t: e.logprob for t, e in ls.items()}
    alone = [_run(llm, [p], params)[0] for p in prompts]  # C path, one row per step
    assert [a.token_ids for a in alone] == [f.token_ids for f in fast]

