"""Command line: ``tokenmill generate "text"`` and ``tokenmill chat``.

Both stream tokens to the terminal as the engine produces them. ``chat`` keeps the
conversation and re-applies the model's chat template every turn, like ``ollama run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterator

from tokenmill.engine_args import EngineArgs


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


def sampling_params(a: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, max_tokens=a.max_tokens,
        min_tokens=a.min_tokens, seed=a.sampling_seed, stop=a.stop, ignore_eos=a.ignore_eos)


def stream(engine, prompt: str | list[int], params) -> Iterator[str]:
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
    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(a)))
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
    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(a)))
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
    EngineArgs.add_cli_args(g)
    add_sampling_args(g, max_tokens=128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model")
    c.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(c)
    add_sampling_args(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)

    from tokenmill.server.cli_serve import add_serve_parser  # imports nothing heavy

    add_serve_parser(sub)

    from tokenmill.bench import add_bench_parser

    add_bench_parser(sub)

    from tokenmill.router.cli_router import add_router_parser

    add_router_parser(sub)
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
