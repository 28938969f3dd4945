"""Greedy tokens of tokenmill's packed path against llama.cpp on the same GGUF.

    python benchmarks/llama_cpp_parity.py
        [--llama-python ~/.cache/tokenmill/llama-cpp-venv/bin/python]

Both round activations to 8 bits per block of 32 and use the weights as stored, so their
greedy continuations should agree for a long way. Prints, per prompt, how many of the 64
greedy tokens agree before the first difference. Needs llama-cpp-python in its own venv
(see benchmarks/llama_cpp_compare.sh); not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from tokenmill import LLM, SamplingParams
from tokenmill.loader.default_model import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who",
           "Q: What is 12 * 7?\nA:", "List three primary colors:", "import numpy as np\n",
           "The theory of relativity", "Write a haiku about the ocean."]

LLAMA_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_threads=2, verbose=False, n_ctx=512, logits_all=False)
out = []
for ids in prompts:
    llm.reset()
    toks = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        toks.append(tok)
        if len(toks) == n:
            break
    out.append(toks)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", default=os.path.expanduser(
        "~/.cache/tokenmill/llama-cpp-venv/bin/python"))
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model = default_model_path()
    llm = LLM(model=model, show_progress=False, kv_cache_memory="128MiB")
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    res = subprocess.run([args.llama_python, "-c", LLAMA_SCRIPT, model, str(args.tokens)],
                         input=json.dumps(prompts), capture_output=True, text=True, check=True)
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    total = 0
    for p, a, b in zip(PROMPTS, ours, theirs, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)))
        total += same
        print(f"{same:>3}/{args.tokens} agree  {p[:40]!r}")
    print(f"total {total}/{args.tokens * len(PROMPTS)} greedy tokens before the first "
          "difference")


if __name__ == "__main__":
    main()
