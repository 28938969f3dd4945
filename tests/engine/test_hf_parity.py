"""Our engine against Hugging Face transformers on the same weights, in fp32.

Tolerance: top-5 logprobs within 1e-3 (absolute) of transformers' at every generated
position; greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_ARCHS, random_prompts
from tokenmill import LLM, SamplingParams

NUM_TOKENS = 32
LOGPROB_ATOL = 1e-3


def hf_greedy(model_dir: str, prompts: list[list[int]], n: int):
    """transformers' greedy tokens and per-step log-softmax, one prompt at a time."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    results = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens = out.sequences[0, len(p):].tolist()
        logprobs = torch.stack([torch.log_softmax(x[0].float(), -1) for x in out.logits])
        results.append((tokens, logprobs))
    return results


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_and_logprobs_match_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    prompts = random_prompts(8, 512, seed=7, min_len=1, max_len=70)
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory="16MiB",
              max_num_batched_tokens=64, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    ours = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy(path, prompts, NUM_TOKENS)
    for out, (tokens, hf_lp) in zip(ours, expected, strict=True):
        comp = out.outputs[0]
        assert comp.token_ids == tokens
        assert comp.finish_reason == "length"
        for pos, entry in enumerate(comp.logprobs):
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:5]
            assert len(top) == 5
            for tok, lp in top:
                assert abs(lp.logprob - hf_lp[pos, tok].item()) < LOGPROB_ATOL, (pos, tok)
