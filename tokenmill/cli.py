"""Command line: ``tokenmill generate "text"`` and ``tokenmill chat``.

Both stream tokens to the terminal as the engine produces them. ``chat`` keeps the
conversation and re-applies the model's chat template every turn, like ``ollama run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from tokenmill.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model)")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU), float32, bfloat16, "
                                                   "float16")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from the config, for benchmarks")
    g.add_argument("--quantization", default="auto", choices=["auto", "none"],
                   help="auto: GGUF Q4_0/Q4_1/Q8_0 weights stay packed on CPU and C kernels "
                        "multiply them; none: dequantize every weight at load")
    g.add_argument("--kv-cache-memory", default="2GiB", help="KV pool size, e.g. 2GiB")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="auto: float16 for a GGUF whose weights stay packed on CPU (as "
                        "llama.cpp), else the model dtype")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's, capped by the KV pool)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="requests run at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget per step (prefill chunk size)")
    g.add_argument("--no-chunked-prefill", action="store_true",
                   help="admit prompts whole instead of in chunks")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="turn off the radix prefix cache (on by default)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "lpm"],
                   help="lpm: among equal priorities, longest cached prefix first")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, tokenizer=a.tokenizer, dtype=a.dtype, load_format=a.load_format,
                kv_cache_memory=a.kv_cache_memory, block_size=a.block_size,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens,
                enable_chunked_prefill=not a.no_chunked_prefill, seed=a.seed,
                enable_prefix_caching=not a.no_prefix_caching,
                scheduling_policy=a.scheduling_policy, quantization=a.quantization,
                device=a.device, kv_cache_dtype=a.kv_cache_dtype)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, max_tokens=a.max_tokens,
        min_tokens=a.min_tokens, seed=a.sampling_seed, stop=a.stop, ignore_eos=a.ignore_eos)


def stream(engine, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
    """Runs one request to the end, yielding its new text as it becomes final."""
    rid = engine.add_request(prompt, params)
    shown = 0
    try:
        while True:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                text = out.outputs[0].text
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
                if out.finished:
                    return
    finally:
        engine.abort_request(rid)  # no-op when finished; frees blocks on Ctrl-C


def cmd_generate(a: argparse.Namespace) -> int:
    from tokenmill.entrypoints.llm import LLM

    params = sampling_params(a)  # bad flags fail before the model loads
    llm = LLM(**engine_kwargs(a))
    tok = llm.get_tokenizer()
    prompt: str | list[int] = a.prompt
    if a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
        prompt = tok.encode(text, add_special_tokens=False)
    for piece in stream(llm.engine, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from tokenmill.entrypoints.llm import LLM

    params = sampling_params(a)
    llm = LLM(**engine_kwargs(a))
    tok = llm.get_tokenizer()
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    interactive = sys.stdin.isatty()
    print("Type a message; /bye or Ctrl-D to quit, /clear to forget the conversation.",
          file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        reply = []
        try:
            for piece in stream(llm.engine, ids, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this answer, keep the conversation
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("\n\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the chat template")
    add_engine_args(g)
    add_sampling_args(g, max_tokens=128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    add_sampling_args(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)

    from tokenmill.server.cli_serve import add_serve_parser  # imports nothing heavy

    add_serve_parser(sub)

    from tokenmill.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
