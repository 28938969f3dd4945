"""``--quantization q8_0|q4_0|q4_k`` on a Hugging Face folder: the linear weights are
quantized at load and run packed; the model's numbers are those of its quantized
weights, and near float32's by the scheme's precision.

Agreement is measured teacher-forced (``prompt_logprobs``: the top-1 token at each
prompt position, and the log-probability of the prompt's own token), over 8 random
prompts of 100 tokens (792 positions). Tiny random-weight models have no structure to
absorb rounding, so 4-bit schemes move them far more than they move a trained model;
the bounds below are the measured values with some room (measured on this 2-core
machine: q8_0 0.93 / 0.96 top-1 agreement, q4_0 0.40 / 0.59, q4_k 0.46 / 0.79, for the
256-wide Llama / the 64-wide tied Qwen2), and a broken packing (about 1/512 agreement)
fails them all.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams
from tokenmill.gguf.quant_types import QuantizedTensor
from tokenmill.kernels.cpu import kernels
from tokenmill.loader.quantize_at_load import QuantizeAtLoad

pytestmark = pytest.mark.skipif(kernels() is None, reason="needs the CPU kernels")

PROMPTS = [torch.randint(3, 512, (100,), generator=torch.Generator().manual_seed(i)).tolist()
           for i in range(8)]
# scheme -> minimal top-1 agreement with float32, largest mean |d logprob|: per model
FLOAT_BOUNDS = {
    "wide": {"q8_0": (0.85, 0.1), "q4_0": (0.3, 0.8), "q4_k": (0.35, 0.75)},
    "qwen2": {"q8_0": (0.9, 0.04), "q4_0": (0.45, 0.3), "q4_k": (0.65, 0.15)},
}


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory) -> str:
    """A random Llama whose rows are whole Q4_K super-blocks (hidden 256, MLP 512),
    with its own (untied) output head."""
    import transformers as tf

    torch.manual_seed(1234)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.1,
                         tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("tiny-wide-llama"))
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(wide_llama_dir, tiny_model_dir) -> dict[str, str]:
    return {"wide": wide_llama_dir, "qwen2": tiny_model_dir("qwen2")}


def teacher_forced(path: str, quantization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 token, logprob of the prompt's token) at every prompt position after the
    first; the KV cache in float32 so that only the weights differ."""
    llm = LLM(path, skip_tokenizer_init=True, quantization=quantization,
              kv_cache_memory="16MiB", kv_cache_dtype="float32", show_progress=False)
    return prompt_top1_and_logprobs(llm, PROMPTS)


def prompt_top1_and_logprobs(llm: LLM, prompts: list[list[int]]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced, from ``prompt_logprobs``: the top-1 token at every prompt position
    after the first, and the logprob of the prompt's own token there (also used by
    benchmarks/hf_quantize_at_load.py)."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1,
                                                prompt_logprobs=1), use_tqdm=False)
    top, logprob = [], []
    for out, prompt in zip(outs, prompts, strict=True):
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            top.append(next(t for t, lp in entry.items() if lp.rank == 1))
            logprob.append(entry[prompt[pos]].logprob)
    return torch.tensor(top), torch.tensor(logprob)


def packed_types(path: str, quantization: str) -> dict[str, int]:
    from tokenmill.engine.model_loading import weight_summary

    llm = LLM(path, skip_tokenizer_init=True, quantization=quantization,
              kv_cache_memory="4MiB", show_progress=False)
    return weight_summary(llm.engine.runner.model)


def dequantized_copy(src: str, dst: str, scheme: str) -> None:
    """The folder with every tensor the scheme quantizes replaced by its dequantized
    blocks: a float model with exactly the quantized weights."""
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        tied = bool(json.load(f).get("tie_word_embeddings"))
    file = os.path.join(dst, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    plan = QuantizeAtLoad(scheme, tied)
    for name, t in plan.apply(iter(list(tensors.items()))):
        tensors[name] = t.dequantize() if isinstance(t, QuantizedTensor) else t
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("model", ["wide", "qwen2"])
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k"])
def test_quantized_model_agrees_with_float32(folders, model, scheme, tmp_path):
    ref_top, ref_lp = teacher_forced(folders[model], "none")
    top, lp = teacher_forced(folders[model], scheme)
    agree = (top == ref_top).float().mean().item()
    drift = (lp - ref_lp).abs().mean().item()
    min_agree, max_drift = FLOAT_BOUNDS[model][scheme]
    assert agree >= min_agree and drift <= max_drift, (agree, drift)
    # and it computes with exactly its quantized weights: a float32 model holding their
    # dequantized values gives the same numbers, up to the activations' 8-bit rounding
    dequantized_copy(folders[model], str(tmp_path / "deq"), scheme)
    deq_top, deq_lp = teacher_forced(str(tmp_path / "deq"), "none")
    assert (top == deq_top).float().mean().item() >= 0.9
    assert (lp - deq_lp).abs().mean().item() < 0.05


def test_weights_stay_packed_in_the_schemes_types(folders):
    wide = packed_types(folders["wide"], "q4_k")
    assert "Q4_K packed x 8" in wide and "Q8_0 packed x 1" in wide  # 2 x (qkv, o, gu, d)
    narrow = packed_types(folders["qwen2"], "q4_k")  # 64-wide rows: Q5_0, tied head Q8_0
    assert "Q5_0 packed x 8" in narrow and "Q8_0 packed x 1" in narrow


def test_greedy_generation_runs(folders):
    llm = LLM(folders["wide"], skip_tokenizer_init=True, quantization="q4_k",
              kv_cache_memory="4MiB", show_progress=False)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]


def test_refused_where_it_does_not_apply(folders):
    with pytest.raises(ValueError, match="already quantized: use --quantization auto"):
        LLM("model-Q4_K_M.gguf", quantization="q4_k")
    with pytest.raises(ValueError, match="CPU kernels"):
        LLM(folders["wide"], quantization="q8_0", device="cuda")
    with pytest.raises(ValueError, match="dummy"):
        LLM(folders["wide"], quantization="q8_0", load_format="dummy")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(folders["wide"], quantization="q3_k")
