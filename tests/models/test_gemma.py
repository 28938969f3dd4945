"""Gemma 2, Gemma 3 (text) and windowed Mistral against transformers (eager attention)
on tiny random-weight models, in float32.

The windows are small (8 and 12 tokens) and the prompts up to 40 tokens, so most
positions attend to a window, not the whole prefix; prefill runs in chunks of 16 tokens
(chunked prefill), the batch mixes prompt lengths, and one run has a KV pool small enough
to preempt. Greedy tokens must be identical and top-5 logprobs within 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams

NUM_TOKENS = 12
LOGPROB_ATOL = 1e-3
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
             initializer_range=0.1)


def _config(arch: str):
    import transformers as tf

    if arch == "gemma2":  # alternating local/global, both soft-caps on
        return tf.Gemma2Config(**SHAPE, num_hidden_layers=3, sliding_window=8,
                               query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0)
    if arch == "gemma3":  # layer 6 global (rope base 1M, linear scaling), others local
        return tf.Gemma3TextConfig(
            **SHAPE, num_hidden_layers=7, sliding_window=8, query_pre_attn_scalar=24,
            rope_parameters={"sliding_attention": {"rope_type": "default",
                                                   "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 1000000.0}})
    if arch == "mistral":
        return tf.MistralConfig(**SHAPE, num_hidden_layers=2, sliding_window=12)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers as tf

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(99)
            cfg = _config(arch)
            cfg._attn_implementation = "eager"
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                        attn_implementation="eager")
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model.save_pretrained(path, safe_serialization=True)
            cache[arch] = path
        return cache[arch]

    return make


def hf_greedy(path: str, prompts: list[list[int]], n: int):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        res = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        lp = torch.stack([torch.log_softmax(x[0].float(), -1) for x in res.logits])
        out.append((res.sequences[0, len(p):].tolist(), lp))
    return out


def assert_matches(ours, expected) -> None:
    for i, (out, (tokens, hf_lp)) in enumerate(zip(ours, expected, strict=True)):
        comp = out.outputs[0]
        assert comp.token_ids == tokens, i
        for pos, entry in enumerate(comp.logprobs):
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:5]
            assert len(top) == 5
            for tok, lp in top:
                assert abs(lp.logprob - hf_lp[pos, tok].item()) < LOGPROB_ATOL, (i, pos, tok)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "mistral"])
def test_windowed_models_match_transformers(arch, model_dir):
    path = model_dir(arch)
    prompts = random_prompts(5, 512, seed=3, min_len=1, max_len=40)
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="4MiB",
              max_num_batched_tokens=16, block_size=4, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    assert_matches(llm.generate(prompts, params, use_tqdm=False),
                   hf_greedy(path, prompts, NUM_TOKENS))
