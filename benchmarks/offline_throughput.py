"""Offline throughput of LLM.generate next to transformers' generate, in one run.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--input-len 100]
        [--output-len 128] [--hf-batch 32] [--model PATH] [--quantization auto|none]
        [--skip-hf]

Prompts are random token ids (the same for both engines); EOS is ignored so every
request produces exactly --output-len tokens. transformers runs fp32, left-padded
batches of --hf-batch, greedy.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.loader.default_model import default_model_path


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_tokenmill(model: str, prompts, output_len: int, **engine_args) -> float:
    llm = LLM(model, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    assert total == len(prompts) * output_len
    return total / elapsed


def run_transformers(model: str, prompts, output_len: int, batch: int) -> float:
    import transformers as tf

    if model.endswith(".gguf"):
        hf = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(model),
                                                     gguf_file=os.path.basename(model),
                                                     dtype=torch.float32)
    else:
        hf = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.generation_config.pad_token_id = 0
    start = time.perf_counter()
    total = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False)
        total += (out.shape[1] - width) * len(chunk)
    return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--quantization", default="auto", choices=["auto", "none"])
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    model = a.model or default_model_path()
    prompts = make_prompts(a.num_prompts, a.input_len, 49152 if a.model is None else 1000)
    ours = run_tokenmill(model, prompts, a.output_len, max_num_seqs=a.max_num_seqs,
                         max_num_batched_tokens=a.max_num_batched_tokens,
                         quantization=a.quantization)
    print(f"tokenmill LLM.generate (--quantization {a.quantization}): {ours:.1f} output tok/s "
          f"({a.num_prompts} prompts x {a.input_len} in, {a.output_len} out)")
    if not a.skip_hf:
        theirs = run_transformers(model, prompts, a.output_len, a.hf_batch)
        print(f"transformers generate (batch {a.hf_batch}): {theirs:.1f} output tok/s")
        print(f"ratio: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
