"""What both generation endpoints share: ``ServingContext`` (the engine behind its facade,
the served names, the metrics, the operator's limits and the checks every request goes
through), the shape of ``usage`` and prompt logprobs, and ``StreamedChoice``, the one place
where the engine's cumulative outputs become stream deltas.

Tokenization and chat-template rendering take time proportional to the prompt (seconds for
megabytes), so they run in a small thread pool (``off_loop``), never on the event loop:
/health and every stream keep going while a long prompt is tokenized.

Admission counts sequences, not requests: k prompts with n choices each are k x n
sequences, refused with 429 when the sequences already waiting plus these would exceed
``--max-queued-requests`` (and with 400 when a request alone could never fit).

The engine's outputs are cumulative (text and token ids so far), so a stream keeps, per
choice, how much it has already sent and emits only the difference; the concatenated
deltas are the non-streamed text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from tokenmill.engine.async_engine import AsyncEngine, QueueFullError
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.constraints import Constraint
from tokenmill.server.errors import (
    context_length_exceeded,
    from_value_error,
    invalid_request,
    model_not_found,
)
from tokenmill.server.limits import ServerLimits
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import PromptTokensDetails, UsageInfo
from tokenmill.server.sse import EngineStreams, until_disconnected
from tokenmill.tokenizer import Tokenizer

T = TypeVar("T")
TOKENIZER_THREADS = 2


@dataclass
class ServingContext:
    """What every endpoint needs: the engine, the names the model answers to (the
    first is the one reported in responses), the metrics and the operator's limits."""

    engine: AsyncEngine
    model_names: list[str]
    metrics: ServerMetrics
    limits: ServerLimits = dataclass_field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(TOKENIZER_THREADS,
                                            thread_name_prefix="tokenmill-tokenize")
        self._in_flight = 0  # sequences of the requests started here and not yet ended

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the tokenizer threads (tokenizing, rendering templates)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.engine.tokenizer
        if tok is None:
            raise invalid_request("this model was loaded without a tokenizer; the server "
                                  "needs one")
        return tok

    def check_model(self, name: str | None) -> None:
        """Accepts the served names only; None means the default."""
        if name is not None and name not in self.model_names:
            raise model_not_found(name)

    def check_request(self, model: str | None, stream: bool, prompt_logprobs,
                      priority: int = 0) -> None:
        """Checks shared by both endpoints: the model name, what streaming allows, and
        whether the operator lets clients set a priority."""
        self.check_model(model)
        if stream and prompt_logprobs is not None:
            raise invalid_request("prompt_logprobs is not supported with stream",
                                  "prompt_logprobs")
        if priority and not self.limits.allow_request_priority:
            raise invalid_request("priority is not enabled on this server (its operator can "
                                  "allow it with --allow-request-priority); remove it or "
                                  "send 0", "priority")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise invalid_request(f"The {param} is empty.", param)
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise invalid_request(f"token id {bad[0]} in {param} is outside the vocabulary "
                                  f"[0, {vocab}).", param)

    def make_params(self, kwargs: dict[str, Any], prompt_len: int, max_tokens: int | None,
                    param: str, constraint: Constraint | None = None) -> SamplingParams:
        """SamplingParams with ``max_tokens`` resolved against the context, or a 400."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise context_length_exceeded(limit, prompt_len, None, param)
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise context_length_exceeded(limit, prompt_len, max_tokens, param)
        if constraint is not None:
            kwargs = {**kwargs, "structured_outputs": constraint.params}
        try:
            params = SamplingParams(**kwargs, max_tokens=max_tokens or limit - prompt_len)
        except ValueError as e:
            raise from_value_error(e) from e
        for field in ("logit_bias", "stop_token_ids"):
            ids = list(getattr(params, field) or [])
            if ids:
                self.check_token_ids(ids, field)
        return params

    async def check_constraint(self, constraint: Constraint | None) -> None:
        """Parses the constraint (and starts compiling it) off the event loop; a 400 naming
        the field it came from if it is invalid."""
        if constraint is None:
            return
        structured = self.engine.structured_outputs
        try:
            await asyncio.to_thread(structured.grammar_for, constraint.params)
        except ValueError as e:
            raise invalid_request(f"{constraint.param}: {e}", constraint.param) from e

    def admit(self, sequences: int, param: str) -> None:
        """Refuses ``sequences`` more when the queue cannot take them (see the module doc).
        Queued = sequences of open requests minus those the engine is running."""
        limit = self.limits.max_queued_sequences
        if limit is None:
            return
        if sequences > limit:
            raise invalid_request(f"this request asks for {sequences} sequences (prompts x "
                                  f"n), more than this server queues ({limit}); send fewer "
                                  "prompts or a smaller n", param)
        queued = max(0, self._in_flight - self.engine.stats().num_running)
        if queued + sequences > limit:
            raise QueueFullError(f"{queued} sequences are already queued and this request "
                                 f"adds {sequences} (at most {limit}); retry later")

    async def start(self, request_id: str, prompts: list[list[int]],
                    params: list[SamplingParams], priority: int) -> EngineStreams:
        """Starts one engine request per prompt (``prompt_index`` is the index in the
        merged stream); raises QueueFullError & co. if the engine refuses one."""
        sequences = sum(p.n for p in params)
        self.admit(sequences, "n")
        self._in_flight += sequences

        def ended() -> None:
            self._in_flight -= sequences

        try:
            streams = await EngineStreams.start([
                self.metrics.observe(self.engine.generate(ids, p, f"{request_id}-{i}",
                                                          priority))
                for i, (ids, p) in enumerate(zip(prompts, params, strict=True))])
        except BaseException:
            ended()
            raise
        streams.on_done(ended)  # when its engine requests end, however they end
        return streams

    async def run(self, raw: Request, streams: EngineStreams) -> dict[int, RequestOutput]:
        """The final output of every prompt (non-streaming), unless the client leaves."""
        async def collect() -> dict[int, RequestOutput]:
            final: dict[int, RequestOutput] = {}
            async for i, out in streams:
                final[i] = out
            return final

        try:
            return await until_disconnected(raw, collect())
        finally:
            await streams.aclose()


def json_response(model: Any) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def usage(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def prompt_logprobs_json(entries: list[PositionLogprobs | None] | None):
    """vLLM's shape: per prompt position None or {token_id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {t: {"logprob": lp.logprob, "rank": lp.rank,
                                        "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


@dataclass
class StreamedChoice:
    """How much of one choice a stream has sent."""

    text_len: int = 0
    num_tokens: int = 0
    started: bool = False
    done: bool = False

    def new_text(self, o: CompletionOutput) -> str:
        return o.text[self.text_len:]

    def new_token_ids(self, o: CompletionOutput) -> list[int]:
        return o.token_ids[self.num_tokens:]

    def new_logprobs(self, o: CompletionOutput) -> list[PositionLogprobs]:
        return (o.logprobs or [])[self.num_tokens:len(o.token_ids)]

    def mark_sent(self, o: CompletionOutput, finished: bool) -> None:
        """Everything of ``o`` so far has been sent (the last time, if ``finished``)."""
        self.text_len, self.num_tokens = len(o.text), len(o.token_ids)
        self.started, self.done = True, finished
