"""What structured outputs cost: grammar compile time, and the per-step cost of the mask.

    python benchmarks/structured_overhead.py [--batch-sizes 1,32] [--steps 64]

1. Start-up: importing xgrammar and building its tokenizer info (once per engine).
2. Compile time of JSON schemas, cold (cache cleared before each run), median of runs.
3. Per-step mask cost, measured on the sampler's own code path: for B sequences, each
   following a real JSON output of the default model token by token, one step is "fill
   the bitmask rows, apply them to [B, vocab] logits, feed the sampled tokens to the
   matchers". Reported as ms per step next to the time of the rest of a sampling step
   (the unconstrained Sampler call on the same logits).
4. End to end: B requests decoding 64 tokens with a regex constraint that never ends
   early vs none, through ``LLM.generate`` (ms per decode step, includes everything).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.model_runner import sampling_metadata
from tokenmill.engine.sequence import Sequence
from tokenmill.structured import StructuredOutputsParams

TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "format": "email"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                 "city": {"type": "string"}},
                "required": ["street", "city"]}},
    "required": ["name", "age", "address"]}
LARGE = {"type": "object", "properties": {
    f"field_{i}": [{"type": "string"}, {"type": "integer"}, {"type": "number"},
                   {"type": "boolean"}, {"enum": ["a", "b", "c"]}][i % 5] for i in range(80)}}


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def compile_times(llm: LLM) -> None:
    t0 = time.perf_counter()
    backend = llm.engine.structured.backend  # imports xgrammar, builds the tokenizer info
    print(f"backend start-up (import xgrammar + tokenizer info): "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    for name, schema in (("typical schema (5 fields, nested)", TYPICAL),
                         ("large schema (80 fields)", LARGE)):
        params = StructuredOutputsParams(json=schema)

        def cold(params=params):
            backend.compiler.clear_cache()
            backend.compile(backend.parse(params))

        print(f"compile {name}: {median_ms(cold, 7):.1f} ms (median of 7, cold)")
    params = StructuredOutputsParams(json=TYPICAL)
    print(f"parse only (validation, on the request path): "
          f"{median_ms(lambda: backend.parse(params), 7):.2f} ms")


def mask_cost(llm: LLM, batch_sizes: list[int], steps: int) -> None:
    engine = llm.engine
    tok, sampler = engine.tokenizer, engine.runner.sampler
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON."}]), add_special_tokens=False)
    params = SamplingParams(n=max(batch_sizes), temperature=0.8, seed=0, max_tokens=steps,
                            structured_outputs={"json": TYPICAL})
    outputs = [o.token_ids for o in llm.generate(prompt, params, use_tqdm=False)[0].outputs]
    vocab = engine.model_config.vocab_size
    for batch in batch_sizes:
        paths = outputs[:batch]
        n_steps = min(len(p) for p in paths)
        reqs = [Sequence(f"b{i}", prompt, SamplingParams(temperature=0)) for i in range(batch)]
        logits = torch.randn(batch, vocab)
        meta = sampling_metadata(reqs)
        plain_ms = median_ms(lambda meta=meta, logits=logits: sampler(logits, meta), 20)
        for r in reqs:
            r.grammar = engine.structured.grammar_for(StructuredOutputsParams(json=TYPICAL))
            assert r.grammar.future.result() is not None and r.grammar.ready()
        rows = list(range(batch))
        backend = reqs[0].grammar.backend
        bitmask = backend.allocate_bitmask(batch)
        t0 = time.perf_counter()
        for step in range(n_steps):
            backend.fill_bitmask([r.grammar.matcher for r in reqs], bitmask, rows)
            backend.apply_bitmask(logits, bitmask, rows)
            for r, path in zip(reqs, paths, strict=True):
                assert r.grammar.accept(path[step])
        mask_ms = (time.perf_counter() - t0) * 1000 / n_steps
        print(f"batch {batch:>3}: mask (fill + apply + accept) {mask_ms:.3f} ms/step over "
              f"{n_steps} steps; unconstrained sampler call {plain_ms:.3f} ms")


def end_to_end(llm: LLM, batch_sizes: list[int], reps: int = 3) -> None:
    tok = llm.engine.tokenizer
    prompt = tok.encode("Write a long sentence about the sea:")
    runs = (("none", None), ("regex", {"regex": "[a-zA-Z ,.]{4000}"}))
    for batch in batch_sizes:
        results: dict[str, list[float]] = {label: [] for label, _ in runs}
        for rep in range(reps + 1):  # interleaved, so a drifting machine hits both alike
            for label, constraint in runs:
                params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                                        structured_outputs=constraint)
                t0 = time.perf_counter()
                outs = llm.generate([prompt] * batch, params, use_tqdm=False)
                elapsed = time.perf_counter() - t0
                assert all(len(o.outputs[0].token_ids) == 64 for o in outs)
                if rep:  # the first round warms up (and compiles the regex)
                    results[label].append(elapsed * 1000 / 64)
        med = {label: statistics.median(v) for label, v in results.items()}
        print(f"batch {batch:>3} end to end: {med['none']:.1f} ms/step unconstrained, "
              f"{med['regex']:.1f} ms/step with a regex (median of {reps}, interleaved)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-end-to-end", action="store_true")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(show_progress=False, max_num_seqs=max(max(batch_sizes), 8))
    print(f"torch threads: {torch.get_num_threads()}")
    compile_times(llm)
    mask_cost(llm, batch_sizes, args.steps)
    if not args.no_end_to_end:
        end_to_end(llm, batch_sizes)


if __name__ == "__main__":
    main()
