"""``tokenmill bench throughput``: offline throughput of ``LLM.generate``.

``--num-prompts`` random token-id prompts of ``--input-len`` tokens, each generating
exactly ``--output-len`` tokens (``ignore_eos``), all submitted at once so the
scheduler's batching decides the pace. A two-request warm-up on other prompts runs
first (so the prefix cache cannot help the timed run). Reports requests/s, output
tokens/s and total (prompt + output) tokens/s over the wall time of the timed
``generate`` call.
"""

from __future__ import annotations

import argparse
import random
import time

from tokenmill.bench.offline import build_llm, check_positive, random_token_prompts, write_json
from tokenmill.bench.spec_metrics import engine_spec_counters, spec_line, spec_summary


def cmd_bench_throughput(a: argparse.Namespace) -> int:
    from tokenmill.sampling_params import SamplingParams

    check_positive(a, "num_prompts", "input_len", "output_len")
    llm = build_llm(a, a.input_len + a.output_len)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(a.seed)
    warmup = random_token_prompts(2, min(a.input_len, 16), vocab, rng)
    llm.generate(warmup, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    prompts = random_token_prompts(a.num_prompts, a.input_len, vocab, rng)
    params = SamplingParams(temperature=a.temperature, max_tokens=a.output_len,
                            ignore_eos=True, seed=a.seed if a.temperature > 0 else None)
    spec_before = engine_spec_counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not a.disable_tqdm)
    elapsed = time.perf_counter() - start
    spec = spec_summary(spec_before, engine_spec_counters(llm))
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    result = {"num_prompts": a.num_prompts, "input_len": a.input_len,
              "output_len": a.output_len, "elapsed_s": elapsed,
              "total_input_tokens": n_in, "total_output_tokens": n_out,
              "requests_per_s": len(outs) / elapsed, "output_tokens_per_s": n_out / elapsed,
              "total_tokens_per_s": (n_in + n_out) / elapsed, **spec}
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, "
          f"{result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s "
          f"({len(outs)} requests, {n_in} prompt + {n_out} output tokens in {elapsed:.2f} s)")
    if spec:
        print(spec_line(spec))
    write_json(a.output_json, result)
    return 0
