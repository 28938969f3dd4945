"""``tokenmill bench serve``: a serving benchmark for any OpenAI-compatible server.

The run, in order:

1. Find the model (``--model``, else the first of GET /v1/models). An unreachable
   server fails here with a clear message.
2. Calibrate words to tokens: two non-streaming probes of 16 and 80 random words with
   ``max_tokens=1``; their ``usage.prompt_tokens`` give tokens-per-word and the fixed
   per-prompt overhead (BOS, chat markup). The probes also warm the server up.
   ``--no-calibrate`` assumes one token per word.
3. Build the dataset's sessions (see ``datasets``) and the arrival time of each
   session (see ``arrivals``; for multi-turn the rate paces conversations, and a
   conversation's turns follow each other as soon as the previous answer is in).
4. Send everything, at most ``--max-concurrency`` requests in flight, streaming and
   timing every chunk (see ``client``), with a progress bar.
5. Summarize (see ``metrics``), print, and optionally save the JSON and the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from tokenmill.bench.arrivals import arrival_offsets
from tokenmill.bench.client import BenchClient, RequestRecord, RequestTemplate
from tokenmill.bench.datasets import (
    Calibration,
    DatasetSpec,
    Session,
    build_sessions,
    messages_to_prompt,
    random_words,
    session_messages,
)
from tokenmill.bench.metrics import parse_slo, summarize
from tokenmill.bench.report import format_summary, write_result_json
from tokenmill.bench.spec_metrics import spec_counters, spec_summary

PROBE_WORDS = (16, 80)
SYSTEM_PROBE_WORDS = 8


def parse_id_list(text: str | None) -> tuple[int, ...] | None:
    """``"0,2"`` -> ``(0, 2)``; None or empty stays None."""
    if not text:
        return None
    try:
        ids = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--ban-token-ids takes comma-separated token ids, e.g. 0,2; "
                         f"got {text!r}.") from None
    if any(t < 0 for t in ids):
        raise ValueError(f"--ban-token-ids must be >= 0, got {text!r}.")
    return ids or None


@dataclass(frozen=True)
class ServeConfig:
    """The flags of ``bench serve``, validated."""

    base_url: str
    dataset: DatasetSpec
    endpoint: str = "completions"
    model: str | None = None
    api_key: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ban_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    slo: dict[str, float] = field(default_factory=dict)
    calibrate: bool = True
    timeout: float = 3600.0
    result_json: str | None = None
    plot: str | None = None
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}.")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 or inf, got {self.request_rate}.")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}.")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> ServeConfig:
        spec = DatasetSpec(name=a.dataset, num_prompts=a.num_prompts, input_len=a.input_len,
                           output_len=a.output_len, prefix_len=a.prefix_len,
                           num_groups=a.num_groups, num_conversations=a.num_conversations,
                           turns=a.turns, seed=a.seed)
        try:
            extra = json.loads(a.extra_body) if a.extra_body else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body must be a JSON object: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {a.extra_body!r}.")
        endpoint = a.endpoint or ("chat" if a.dataset == "multi-turn" else "completions")
        return cls(base_url=a.base_url, dataset=spec, endpoint=endpoint, model=a.model,
                   api_key=a.api_key, request_rate=a.request_rate, burstiness=a.burstiness,
                   max_concurrency=a.max_concurrency,
                   ban_token_ids=parse_id_list(a.ban_token_ids), temperature=a.temperature,
                   extra_body=extra, slo=parse_slo(a.slo), calibrate=not a.no_calibrate,
                   timeout=a.timeout, result_json=a.result_json, plot=a.plot,
                   disable_tqdm=a.disable_tqdm)


async def calibrate(client: BenchClient, template: RequestTemplate,
                    with_system: bool = False) -> Calibration:
    """Fits prompt tokens against words with two probes (see the module docstring);
    falls back to one token per word when the server reports no usage.

    ``with_system`` probes in the shape of the shared-prefix dataset (a system prompt,
    then a user turn): chat templates often insert a default system prompt only when
    there is none, so the per-prompt overhead differs between the two shapes."""
    rng = random.Random("tokenmill-calibration")
    system = random_words(rng, SYSTEM_PROBE_WORDS) if with_system else None
    tokens = []
    for n in PROBE_WORDS:
        text = random_words(rng, n)
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        body = template.payload(messages, messages_to_prompt(messages), stream=False,
                                max_tokens=1)
        try:
            usage = (await client.post(template.path, body)).get("usage") or {}
        except ValueError as e:
            rejected = any(f"HTTP {code}" in str(e) for code in (400, 422))
            hint = ("" if template.ban_token_ids or not rejected else
                    " If the server rejects ignore_eos or min_tokens, ban the model's EOS "
                    "ids with --ban-token-ids instead.")
            raise ValueError(f"the calibration probe failed: {e}{hint}") from None
        if not usage.get("prompt_tokens"):
            print("warning: the server reports no usage.prompt_tokens; assuming one token "
                  "per word", file=sys.stderr)
            return Calibration()
        tokens.append(int(usage["prompt_tokens"]))
    fit = Calibration.fit(PROBE_WORDS, (tokens[0], tokens[1]))
    if system is None:
        return fit
    return Calibration(fit.intercept - fit.slope * SYSTEM_PROBE_WORDS, fit.slope, True)


async def run_sessions(client: BenchClient, template: RequestTemplate,
                       sessions: list[Session], offsets: list[float],
                       max_concurrency: int | None, bar: tqdm
                       ) -> tuple[list[RequestRecord], float]:
    """Sends every session's turns; returns the records (session by session, turn by
    turn) and the duration from the first send to the last response."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def send(body: dict[str, Any], record: RequestRecord) -> None:
        if limit is None:
            await client.stream(template.path, body, record, start)
            return
        async with limit:
            await client.stream(template.path, body, record, start)

    async def play(session: Session, offset: float) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        answers: list[str] = []
        records: list[RequestRecord] = []
        for turn in range(len(session.user_turns)):
            messages = session_messages(session, turn, answers)
            expected = sum(session.expected_tokens[:turn + 1]) + sum(
                r.completion_tokens for r in records)
            record = RequestRecord(session.session_id, turn, expected, session.group)
            records.append(record)
            if records[:-1] and not records[-2].success:
                record.error = f"skipped: turn {turn - 1} of this conversation failed"
                record.start = time.perf_counter() - start
            else:
                await send(template.payload(messages, messages_to_prompt(messages)), record)
                answers.append(record.text)
            bar.update(1)
        return records

    per_session = await asyncio.gather(*(play(s, o) for s, o in zip(sessions, offsets,
                                                                      strict=True)))
    duration = time.perf_counter() - start
    return [r for rs in per_session for r in rs], duration


async def benchmark(cfg: ServeConfig) -> tuple[dict[str, Any], dict[str, Any],
                                               list[RequestRecord]]:
    """Runs the whole benchmark; returns (config for the report, metrics, records)."""
    async with BenchClient(cfg.base_url, cfg.api_key, cfg.timeout) as client:
        model = cfg.model or await client.first_model()
        template = RequestTemplate(cfg.endpoint, model, cfg.dataset.output_len,
                                   cfg.temperature, cfg.ban_token_ids, cfg.extra_body)
        calib = Calibration()
        if cfg.calibrate:
            calib = await calibrate(client, template,
                                    with_system=cfg.dataset.name == "shared-prefix")
        sessions = build_sessions(cfg.dataset, calib)
        offsets = arrival_offsets(len(sessions), cfg.request_rate, cfg.burstiness,
                                  cfg.dataset.seed)
        print(f"Benchmarking {model} at {client.base_url}{template.path}: "
              f"{cfg.dataset.num_requests} requests ({cfg.dataset.name}), "
              f"request rate {cfg.request_rate}, max concurrency "
              f"{cfg.max_concurrency or 'unlimited'}; "
              f"{calib.slope:.2f} tokens/word + {calib.intercept:.1f} per prompt "
              f"({'measured' if calib.measured else 'assumed'})", file=sys.stderr)
        spec_before = spec_counters(await client.metrics_text())
        with tqdm(total=cfg.dataset.num_requests, disable=cfg.disable_tqdm,
                  desc="requests", unit="req") as bar:
            records, duration = await run_sessions(client, template, sessions, offsets,
                                                   cfg.max_concurrency, bar)
        spec_after = spec_counters(await client.metrics_text())
    metrics = summarize(records, duration, cfg.slo, cfg.dataset.output_len)
    metrics.update(spec_summary(spec_before, spec_after))
    config = asdict(cfg)
    config.pop("api_key")  # never write a secret into a results file
    config.update(model=model, base_url=client.base_url, path=template.path,
                  request_rate=str(cfg.request_rate), calibration=asdict(calib),
                  eos=("logit_bias" if cfg.ban_token_ids else "ignore_eos+min_tokens"))
    return config, metrics, records


def cmd_bench_serve(a: argparse.Namespace) -> int:
    cfg = ServeConfig.from_args(a)
    config, metrics, records = asyncio.run(benchmark(cfg))
    print(format_summary(metrics))
    if cfg.result_json:
        write_result_json(cfg.result_json, config, metrics, records)
        print(f"results written to {cfg.result_json}", file=sys.stderr)
    if cfg.plot:
        from tokenmill.bench.plot import save_plot

        save_plot(cfg.plot, records, metrics,
                  title=f"{config['model']} - {cfg.dataset.name}, "
                        f"concurrency {cfg.max_concurrency or 'unlimited'}")
        print(f"plot written to {cfg.plot}", file=sys.stderr)
    return 0 if metrics["completed"] else 1
