"""Phi-3, SmolLM3 and the Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE) against transformers on the same tiny random weights, in float32.

Each architecture is a tiny model built from its transformers config class and saved as
a Hugging Face folder. Our engine runs a batch of prompts of mixed lengths with a token
budget smaller than the longest prompt (so prefills are chunked) and, from the folder, a
KV pool too small for all of them (so some are preempted); its greedy tokens must equal
transformers' and its top-5 logprobs lie within 1e-3 of transformers' at every generated
position (transformers runs one prompt at a time). Every architecture also loads from a
GGUF file written from the same weights in llama.cpp's layout and must match the same
reference. A MoE quantized at load (q8_0) must agree with float32 running its dequantized
weights (bounds in ``test_quantized_moe_agrees_with_its_dequantized_weights``).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.conftest import TINY, random_prompts
from tests.engine.test_hf_parity import hf_greedy
from tests.engine.test_quantize_at_load import dequantized_copy, teacher_forced
from tests.models_arch.gguf_files import gguf_from_folder
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import kernels

NUM_TOKENS = 12
LOGPROB_ATOL = 1e-3
PROMPTS = random_prompts(5, 512, seed=11, min_len=2, max_len=30)
# Phi-3's longrope takes the long factors past this position. transformers then
# recomputes the whole sequence with them (a step we do not take: see
# LongRopeEmbedding), so the end-to-end runs stay below it and
# test_longrope_tables_match_transformers checks both tables.
ORIGINAL_CTX = 48


def _phi3_config():
    import transformers as tf

    half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
    return tf.Phi3Config(**TINY, pad_token_id=0, original_max_position_embeddings=ORIGINAL_CTX,
                         rope_scaling={"rope_type": "longrope",
                                       "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                       "long_factor": [2.0 + 0.5 * i for i in range(half)]})


def _moe_config(name: str):
    """Tiny MoE configs: 4 experts, 2 per token; Qwen2-MoE with its shared expert,
    un-normalized top-k and a dense first layer (mlp_only_layers); Qwen3-MoE
    normalized, OLMoE not."""
    import transformers as tf

    moe = dict(num_experts_per_tok=2)
    if name == "mixtral":
        return tf.MixtralConfig(**TINY, num_local_experts=4, sliding_window=None, **moe)
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(**TINY, num_experts=4, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=96, norm_topk_prob=False,
                                 mlp_only_layers=[0], **moe)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TINY, num_experts=4, moe_intermediate_size=32, head_dim=16,
                                 norm_topk_prob=True, **moe)
    return tf.OlmoeConfig(**TINY, num_experts=4, norm_topk_prob=False, **moe)


def _smollm3_config():
    """Four layers: the fourth has no rope (llama.cpp's fixed step of 4)."""
    import transformers as tf

    return tf.SmolLM3Config(**{**TINY, "num_hidden_layers": 4}, no_rope_layer_interval=4,
                            pad_token_id=0)


def _wide_qwen3_moe_config():
    """Rows of 256 (whole Q4_K super-blocks) in every matrix of the experts."""
    import transformers as tf

    return tf.Qwen3MoeConfig(**{**TINY, "hidden_size": 256}, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64,
                             norm_topk_prob=True)


CONFIGS = {
    "phi3": _phi3_config,
    "smollm3": _smollm3_config,
    **{name: (lambda name=name: _moe_config(name))
       for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
    "wide_qwen3_moe": _wide_qwen3_moe_config,  # for Q4_K (rows of 256)
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """arch -> (saved tiny HF folder, transformers' greedy tokens and logprobs)."""
    import transformers as tf

    cache: dict[str, tuple[str, list]] = {}

    def make(arch: str) -> tuple[str, list]:
        if arch not in cache:
            torch.manual_seed(1234)
            model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32)
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model.save_pretrained(path)
            cache[arch] = path, hf_greedy(path, PROMPTS, NUM_TOKENS)
        return cache[arch]

    return make


def run_ours(path: str, preempt: bool = False, **kw) -> list:
    """Our greedy run of PROMPTS, all at once with a token budget below the longest
    prompt (chunked prefill); with ``preempt``, a KV pool too small for all of them
    (6 blocks of 16 tokens; they need 11), so that some are preempted and recomputed,
    then a second run of the same prompts that starts from what the prefix cache kept."""
    kv = "8MiB"
    if preempt:  # 8 KiB per block and layer (2 K/V heads of 16, float32, 16 tokens)
        with open(os.path.join(path, "config.json")) as f:
            kv = f"{48 * json.load(f)['num_hidden_layers'] // 2}KiB"
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory=kv, max_num_batched_tokens=24,
              show_progress=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    if preempt:
        assert llm.engine.scheduler.num_preemptions > 0
        # again, now from the prefix cache where it kept blocks: the same tokens
        again = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.engine.block_manager.num_hit_tokens > 0
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    return outs


def assert_matches(ours: list, expected: list, atol: float = LOGPROB_ATOL) -> None:
    for i, (out, (tokens, hf_lp)) in enumerate(zip(ours, expected, strict=True)):
        comp = out.outputs[0]
        assert comp.token_ids == tokens, i
        for pos, entry in enumerate(comp.logprobs):
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:5]
            assert len(top) == 5
            for tok, lp in top:
                assert abs(lp.logprob - hf_lp[pos, tok].item()) < atol, (i, pos, tok)


ARCHS = [a for a in CONFIGS if a != "wide_qwen3_moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_matches_transformers(arch, folder):
    path, expected = folder(arch)
    assert_matches(run_ours(path, preempt=True), expected)


def test_longrope_tables_match_transformers():
    """cos/sin (attention factor included) for positions on both sides of the original
    context equal transformers' rotary embedding for a sequence of that length."""
    import transformers as tf

    from tokenmill.config import ModelConfig
    from tokenmill.layers.rotary import LongRopeEmbedding

    hf = tf.AutoModelForCausalLM.from_config(_phi3_config())
    cfg = ModelConfig.from_hf({**hf.config.to_dict(), "architectures": ["Phi3ForCausalLM"]})
    assert cfg.rope.scaling_type == "longrope" and cfg.rope.attention_factor > 1.2
    ours = LongRopeEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
    x = torch.zeros(1, 1, cfg.hidden_size)
    for positions in (torch.arange(ORIGINAL_CTX), torch.arange(ORIGINAL_CTX, 3 * ORIGINAL_CTX)):
        cos, sin = hf.model.rotary_emb(x, positions[None])  # long factors past ORIGINAL_CTX
        half = cfg.head_dim // 2
        torch.testing.assert_close(ours.cos[positions], cos[0, :, :half])
        torch.testing.assert_close(ours.sin[positions], sin[0, :, :half])


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_transformers(arch, folder, tmp_path):
    """The same weights written as a float32 GGUF in llama.cpp's layout (merged expert
    tensors, Phi-3's fused matrices and longrope factor tensors, Mixtral as a permuted
    ``llama`` file with an expert count)."""
    path, expected = folder(arch)
    gguf = gguf_from_folder(path, str(tmp_path / f"{arch}.gguf"))
    assert_matches(run_ours(gguf, kv_cache_dtype="float32"), expected)


@pytest.mark.skipif(kernels() is None, reason="needs the CPU kernels")
@pytest.mark.parametrize(("arch", "scheme"), [("qwen2_moe", "q8_0"), ("mixtral", "q8_0"),
                                            ("wide_qwen3_moe", "q4_k"), ("phi3", "q8_0"),
                                            ("smollm3", "q8_0")])
def test_packed_gguf_equals_quantize_at_load(arch, scheme, folder, tmp_path):
    """A quantized GGUF runs packed and gives what the float folder quantized at load
    gives: the same blocks, so the same tokens and logprobs. For the MoEs each expert is
    packed from its rows of the merged tensor (Q8_0: regrouped at load; Q4_K, in the
    256-wide model: read in place from the mapped file); Phi-3's fused attn_qkv and
    ffn_up are cut by rows of blocks; SmolLM3's Q/K blocks are un-permuted."""
    path, _ = folder(arch)
    gguf = gguf_from_folder(path, str(tmp_path / "q.gguf"), scheme)
    ours, theirs = run_ours(gguf), run_ours(path, quantization=scheme)
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-5 for t in x)
    model = LLM(gguf, skip_tokenizer_init=True, kv_cache_memory="4MiB",
                show_progress=False).engine.runner.model
    mlp = model.model.layers[1].mlp
    qtype = {"q8_0": 8, "q4_k": 12}[scheme]
    assert all(e.gate_up_proj.packed.qtype == qtype and e.down_proj.packed.qtype == qtype
               for e in getattr(mlp, "experts", [mlp]))
    assert model.model.layers[1].self_attn.qkv_proj.packed.qtype == qtype


@pytest.mark.skipif(kernels() is None, reason="needs the CPU kernels")
def test_quantized_moe_agrees_with_its_dequantized_weights(folder, tmp_path):
    """``--quantization q8_0`` on a MoE folder: experts run packed, and the model
    computes with exactly its quantized weights: teacher-forced over 8 prompts of 100
    tokens (792 positions), a float32 model holding their dequantized values picks the
    same top-1 token at >= 93% of positions with mean |d logprob| < 0.03 (what differs is
    the activations' 8-bit rounding in the Q8_0 kernels; measured 0.962 / 0.015), and the
    float32 original at >= 92% / < 0.04 (measured 0.956 / 0.020). Broken routing or
    packing gives near-chance agreement (about 1/512)."""
    path, _ = folder("qwen3_moe")
    top, lp = teacher_forced(path, "q8_0")
    dequantized_copy(path, str(tmp_path / "deq"), "q8_0")
    deq_top, deq_lp = teacher_forced(str(tmp_path / "deq"), "none")
    assert (top == deq_top).float().mean().item() >= 0.93
    assert (lp - deq_lp).abs().mean().item() < 0.03
    ref_top, ref_lp = teacher_forced(path, "none")
    assert (top == ref_top).float().mean().item() >= 0.92
    assert (lp - ref_lp).abs().mean().item() < 0.04


@pytest.mark.skipif(kernels() is None, reason="needs the CPU kernels")
@pytest.mark.parametrize("arch", ["phi3", "smollm3"])
def test_one_call_decode_step_equals_the_python_layers(arch, folder):
    """Packed (q8_0) Phi-3 and SmolLM3 decode through the one-call C step, which reads
    their rotary tables (longrope's scaled one; the identity of the rope-less layers):
    the same tokens and logprobs as the Python layers."""
    path, _ = folder(arch)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    outs = []
    for use_c in (True, False):
        llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="8MiB", quantization="q8_0",
                  show_progress=False)
        model = llm.engine.runner.model
        if not use_c:
            model._decode_path = False
        outs.append(llm.generate(PROMPTS, params, use_tqdm=False))
        assert bool(model._decode_path) == use_c
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: lp.logprob for t, lp in e.items()} for e in a.outputs[0].logprobs] == [
            {t: lp.logprob for t, lp in e.items()} for e in b.outputs[0].logprobs]


def test_published_phi3_and_moe_configs_read_as_released():
    """Config shapes as the released checkpoints write them: Phi-3.5's longrope with the
    original context at the top level and the old "su" name; the attention factor
    derived from the two context lengths; partial rotary refused; Qwen2-MoE's shared
    expert and sparse step."""
    from tokenmill.config import ModelConfig

    base = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    phi = dict(base, architectures=["Phi3ForCausalLM"], max_position_embeddings=131072,
               original_max_position_embeddings=4096, sliding_window=262144,
               rope_scaling={"type": "su", "short_factor": [1.0] * 48,
                             "long_factor": [2.0] * 48})
    rope = ModelConfig.from_hf(phi).rope
    assert rope.scaling_type == "longrope" and rope.original_max_position_embeddings == 4096
    assert abs(rope.attention_factor - (1 + math.log(32) / math.log(4096)) ** 0.5) < 1e-12
    with pytest.raises(ValueError, match="partial rotary"):
        ModelConfig.from_hf(dict(phi, partial_rotary_factor=0.75))
    qwen = dict(base, architectures=["Qwen2MoeForCausalLM"], num_experts=60,
                num_experts_per_tok=4, moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632, decoder_sparse_step=2,
                mlp_only_layers=[1])
    moe = ModelConfig.from_hf(qwen).moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (60, 4, 1408)
    assert moe.shared_intermediate_size == 5632 and not moe.norm_topk_prob
    assert set(moe.dense_layers) == {*range(0, 32, 2), 1}  # layers 1, 3, ... sparse but 1


@pytest.mark.parametrize("norm", [True, False])
def test_fused_moe_runs_each_chosen_expert_once_per_step(norm):
    """20 tokens, 2 of 8 experts each: every chosen expert runs once, on all of its
    tokens, an unchosen one not at all; the result equals the per-token sum of its
    experts' outputs scaled by the routing weights (softmax, top-2, renormalized or not),
    in a batch and for a token alone."""
    from tokenmill.config import MoEConfig
    from tokenmill.layers.fused_moe import FusedMoE

    torch.manual_seed(0)
    moe = FusedMoE(16, MoEConfig(num_experts=8, top_k=2, intermediate_size=8,
                                 norm_topk_prob=norm, shared_intermediate_size=12))
    for p in moe.parameters():
        p.data.normal_(0, 0.5)
    calls: list[int] = []
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, args, out, i=i: calls.append(i))
    x = torch.randn(20, 16)
    out = moe(x)
    probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)
    weights, ids = probs.topk(2, dim=-1)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    assert calls == sorted(set(ids.flatten().tolist()))
    shared = torch.sigmoid(x @ moe.shared_expert_gate.weight.T) * moe.shared_expert(x)
    expected = torch.stack([
        sum(w * moe.experts[e](x[t:t + 1])[0]
            for w, e in zip(weights[t], ids[t].tolist(), strict=True))
        for t in range(20)]) + shared
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for t in (0, 7):  # a lone token (a batch-1 decode) takes the unsorted path
        torch.testing.assert_close(moe(x[t:t + 1]), expected[t:t + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernels() is None, reason="needs the CPU kernels")
@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_packed_moe_rows_do_not_depend_on_the_batch(arch, folder):
    """On packed weights every row's arithmetic is its own (docs/design.md): each prompt
    run alone (its decode steps take the lone-token expert path) gives exactly the
    tokens and logprobs it gets in the batch (the grouped path; the float router and
    shared-expert gate in float64, OLMoE's full-width q/k norm on contiguous rows)."""
    path, _ = folder(arch)
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="8MiB", quantization="q8_0",
              enable_prefix_caching=False, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)

    def flat(out):
        comp = out.outputs[0]
        return comp.token_ids, [{t: lp.logprob for t, lp in e.items()} for e in comp.logprobs]

    batched = [flat(o) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    alone = [flat(llm.generate([p], params, use_tqdm=False)[0]) for p in PROMPTS]
    assert alone == batched
