"""``--quantization q8_0|q4_0|q4_k`` on a Hugging Face folder: load time and teacher-forced
agreement with the float32 path, on prose.

    python benchmarks/hf_quantize_at_load.py [--model HF_FOLDER] [--schemes q8_0,q4_k]

Without ``--model`` it writes an HF safetensors folder from the embedded SmolLM2-135M
GGUF (its weights dequantized to float32 by our loader; they were Q4_1, so quantizing
them again rounds twice and the 4-bit figures are worse than for an original float
model) under ``benchmarks/results/``. For each scheme it prints the load time and, over
the first 2,048 tokens of this repository's docs in chunks of 512 (prompt_logprobs), the
share of positions whose top-1 token matches ``--quantization none``, the mean absolute
difference of the text's token logprobs and the mean NLL. Not part of CI; timings on a
shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.engine.test_quantize_at_load import prompt_top1_and_logprobs  # noqa: E402
from tokenmill import LLM  # noqa: E402
from tokenmill.loader import open_checkpoint  # noqa: E402
from tokenmill.loader.default_model import default_model_path  # noqa: E402


def hf_folder_from_gguf(gguf: str, out: str) -> str:
    """The GGUF's tensors as float32 safetensors with HF names, its config and tokenizer."""
    import transformers as tf
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(out, exist_ok=True)
    ckpt = open_checkpoint(gguf)
    save_file({n: t.contiguous() for n, t in ckpt.tensors(None)},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(ckpt.hf_config, f)
    tf.AutoTokenizer.from_pretrained(os.path.dirname(gguf),
                                     gguf_file=os.path.basename(gguf)).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder (default: one made from the embedded GGUF)")
    ap.add_argument("--schemes", default="q8_0,q4_0,q4_k")
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    model = a.model or hf_folder_from_gguf(
        default_model_path(), os.path.join(ROOT, "benchmarks", "results", "smollm2-135m-hf"))
    text = "".join(open(os.path.join(ROOT, p), encoding="utf-8").read()
                   for p in ("docs/design.md", "README.md", "docs/performance.md"))
    ref = None
    for scheme in ["none", *a.schemes.split(",")]:
        start = time.perf_counter()
        llm = LLM(model, quantization=scheme, kv_cache_memory="256MiB",
                  kv_cache_dtype="float32", show_progress=False)
        load = time.perf_counter() - start
        ids = llm.engine.tokenizer.encode(text)[:a.tokens]
        top, logprob = prompt_top1_and_logprobs(
            llm, [ids[i:i + 512] for i in range(0, len(ids), 512)])
        ref = ref or (top, logprob)
        print(f"{scheme:5s} load {load:5.1f} s  top-1 agreement "
              f"{(top == ref[0]).float().mean().item():.3f}  mean |d logprob| "
              f"{(logprob - ref[1]).abs().mean().item():.3f}  mean NLL "
              f"{-logprob.mean().item():.3f}  ({len(top)} positions)", flush=True)


if __name__ == "__main__":
    main()
