"""Concurrent streaming clients against any OpenAI-compatible server.

    python bench/stream_clients.py --base-url http://127.0.0.1:8000 --concurrency 32 \
        --input-len 100 --output-len 128 [--chat] [--ban-token-ids 0,2]

Each client sends one streaming request with a prompt of about --input-len tokens of
plain English words and bans the EOS tokens through logit_bias, so every server
generates --output-len tokens. Reports time to first token (mean, p50, p90), inter-token
latency and aggregate output tokens/s. (tokenmill bench serve will grow from this.)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import openai

WORDS = ("time person year way day thing man world life hand part child eye woman place "
         "work week case point government company number group problem fact river stone "
         "light music garden window morning answer story letter mountain ocean").split()


def make_prompt(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one(client, args, prompt: str, model: str):
    bias = {t: -100 for t in args.ban_token_ids}
    start = time.perf_counter()
    stamps: list[float] = []
    if args.chat:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=args.output_len, temperature=0, logit_bias=bias,
            stream_options={"include_usage": True})
    else:
        stream = await client.completions.create(
            model=model, prompt=prompt, stream=True, max_tokens=args.output_len,
            temperature=0, logit_bias=bias, stream_options={"include_usage": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            text = c.delta.content if args.chat else c.text
            if text:
                stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return stamps[0] - start, stamps, end - start, tokens


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async(args) -> None:
    client = openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1",
                                api_key=args.api_key, timeout=3600)
    model = args.model or (await client.models.list()).data[0].id
    rng = random.Random(args.seed)
    prompts = [make_prompt(int(args.input_len * 0.75), rng) for _ in range(args.concurrency)]
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, args, p, model) for p in prompts))
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    itls = [b - a for r in results for a, b in zip(r[1], r[1][1:], strict=False)]
    total = sum(r[3] for r in results)
    print(f"clients: {args.concurrency}  output tokens: {total}  wall: {wall:.1f} s")
    print(f"output tok/s: {total / wall:.1f}")
    print(f"TTFT mean {statistics.mean(ttfts) * 1e3:.0f} ms  p50 {pct(ttfts, .5) * 1e3:.0f} ms"
          f"  p90 {pct(ttfts, .9) * 1e3:.0f} ms")
    if itls:
        print(f"ITL mean {statistics.mean(itls) * 1e3:.1f} ms  p50 {pct(itls, .5) * 1e3:.1f} ms")
    if args.concurrency == 1:
        decode = results[0][2] - results[0][0]
        print(f"single stream decode: {(total - 1) / decode:.1f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ban-token-ids", type=lambda s: [int(x) for x in s.split(",")],
                    default=[0, 2], help="EOS ids to ban (SmolLM2: 0 and 2)")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
