"""``tokenmill bench latency``: how long one batch takes, prefill and decode apart.

Each iteration submits ``--batch-size`` fresh random prompts of ``--input-len`` tokens
(fresh, so the prefix cache never serves an earlier iteration) that each generate
exactly ``--output-len`` tokens, and steps the engine by hand:

* prefill: from the submission until every request has its first token (one step when
  the batch's prompts fit the token budget; with chunked prefill, several);
* decode: from there until the last request finishes, divided by ``output_len - 1``:
  the time per decode step, i.e. per output token of each request;
* total: both together.

``--num-iters-warmup`` untimed iterations run first. Reports mean, p50 and p90 in ms.
"""

from __future__ import annotations

import argparse
import random
import time

from tokenmill.bench.offline import (
    build_llm,
    check_positive,
    ms_stats,
    random_token_prompts,
    write_json,
)


def run_batch(engine, prompts: list[list[int]], params) -> tuple[float, float]:
    """Runs one batch to the end; returns (prefill seconds, decode seconds)."""
    start = time.perf_counter()
    pending = {engine.add_request(p, params) for p in prompts}
    prefill_done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids:
                pending.discard(out.request_id)
        if prefill_done is None and not pending:
            prefill_done = time.perf_counter()
    end = time.perf_counter()
    prefill_done = prefill_done if prefill_done is not None else end
    return prefill_done - start, end - prefill_done


def cmd_bench_latency(a: argparse.Namespace) -> int:
    from tokenmill.sampling_params import SamplingParams

    check_positive(a, "batch_size", "input_len", "output_len", "num_iters")
    if a.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0, got {a.num_iters_warmup}.")
    llm = build_llm(a, a.input_len + a.output_len)
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ValueError("the engine already has requests; bench latency needs it idle.")
    vocab = engine.model_config.vocab_size
    rng = random.Random(a.seed)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    prefill, decode, total = [], [], []
    for i in range(a.num_iters_warmup + a.num_iters):
        prompts = random_token_prompts(a.batch_size, a.input_len, vocab, rng)
        p, d = run_batch(engine, prompts, params)
        if i >= a.num_iters_warmup:
            prefill.append(p)
            decode.append(d / max(1, a.output_len - 1))
            total.append(p + d)
    result = {"batch_size": a.batch_size, "input_len": a.input_len,
              "output_len": a.output_len, "num_iters": a.num_iters,
              "total_ms": ms_stats(total), "prefill_ms": ms_stats(prefill),
              "decode_per_token_ms": ms_stats(decode),
              "total_s": total, "prefill_s": prefill, "decode_per_token_s": decode}
    print(f"batch {a.batch_size} x {a.input_len} prompt tokens, {a.output_len} output "
          f"tokens, {a.num_iters} iterations after {a.num_iters_warmup} warm-up")
    print(f"{'':<22}{'mean':>10}{'p50':>10}{'p90':>10}  (ms)")
    for label, key in (("total", "total_ms"), ("prefill", "prefill_ms"),
                       ("decode per token", "decode_per_token_ms")):
        s = result[key]
        print(f"{label:<22}{s['mean']:>10.2f}{s['p50']:>10.2f}{s['p90']:>10.2f}")
    write_json(a.output_json, result)
    return 0
