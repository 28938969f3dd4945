"""POST /v1/completions, and the ``ServingContext`` both generation endpoints share.

A completion request may carry k prompts (strings or token ids) and ask for n choices
each; it becomes k engine requests with ``SamplingParams(n=n)``, and choice
``prompt_index * n + i`` is completion i of prompt ``prompt_index`` (OpenAI's order).

Everything a client can get wrong is checked before the engine sees the request:
the model name, the prompt (empty, out-of-vocabulary ids, too long for the context), the
sampling values (``SamplingParams`` raises ValueError naming the field) and the token
ids in ``logit_bias`` / ``stop_token_ids``. ``max_tokens`` defaults to what is left of the
context after the prompt, as in vLLM; asking for more than that is a 400.

The engine's outputs are cumulative (text and token ids so far), so the streaming path
keeps, per choice, how much it has already sent and emits only the difference; the
concatenated deltas are the non-streamed text.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.outputs import PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import (
    context_length_exceeded,
    from_value_error,
    invalid_request,
    model_not_found,
)
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from tokenmill.server.sse import EngineStreams, EventStreamResponse, sse_frame, until_disconnected
from tokenmill.server.structured import Constraint, request_constraint
from tokenmill.tokenizer import Tokenizer


@dataclass
class ServingContext:
    """What every endpoint needs: the engine, the names the model answers to (the
    first is the one reported in responses) and the metrics."""

    engine: AsyncEngine
    model_names: list[str]
    metrics: ServerMetrics

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def model_path(self) -> str:
        return self.engine.engine.config.model

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.engine.engine.tokenizer
        if tok is None:
            raise invalid_request("this model was loaded without a tokenizer; the server "
                                  "needs one")
        return tok

    def check_model(self, name: str | None) -> None:
        """Accepts the served names and the model's path; None means the default."""
        if name is not None and name not in self.model_names and name != self.model_path:
            raise model_not_found(name)

    def check_request(self, model: str | None, stream: bool, prompt_logprobs) -> None:
        """Checks shared by both endpoints: the model name and what streaming allows."""
        self.check_model(model)
        if stream and prompt_logprobs is not None:
            raise invalid_request("prompt_logprobs is not supported with stream",
                                  "prompt_logprobs")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise invalid_request(f"The {param} is empty.", param)
        vocab = self.engine.engine.model_config.vocab_size
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
        structured = self.engine.engine.structured
        try:
            await asyncio.to_thread(structured.grammar_for, constraint.params)
        except ValueError as e:
            raise invalid_request(f"{constraint.param}: {e}", constraint.param) from e

    async def start(self, request_id: str, prompts: list[list[int]],
                    params: list[SamplingParams], priority: int) -> EngineStreams:
        """Starts one engine request per prompt (``prompt_index`` is the index in the
        merged stream); raises QueueFullError & co. if the engine refuses one."""
        return await EngineStreams.start([
            self.metrics.observe(self.engine.generate(ids, p, f"{request_id}-{i}", priority))
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))])

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
class _ChoiceState:
    """How much of one choice has been streamed."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


class CompletionHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_request(req.model, req.stream, req.prompt_logprobs)
        constraint = request_constraint(req)
        prompts = [self._tokenize(p) for p in req.prompts()]
        params = [self._params(req, len(ids), constraint) for _, ids in prompts]
        await ctx.check_constraint(constraint)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await ctx.start(request_id, [ids for _, ids in prompts], params,
                                  req.priority)
        if req.stream:
            return EventStreamResponse(self._frames(req, request_id, prompts, streams),
                                       streams)
        final = await ctx.run(raw, streams)
        return json_response(self._response(req, request_id, prompts, final))

    def _tokenize(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        """(text, ids) of one prompt; the text is what ``echo`` sends back."""
        tok = self.ctx.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
            self.ctx.check_token_ids(ids, "prompt")
            return prompt, ids
        self.ctx.check_token_ids(prompt, "prompt")
        return tok.decode(prompt, skip_special_tokens=False), list(prompt)

    def _params(self, req: CompletionRequest, prompt_len: int,
                constraint: Constraint | None) -> SamplingParams:
        kwargs = req.sampling_kwargs()
        kwargs["logprobs"] = req.logprobs
        if req.echo and req.logprobs is not None:
            kwargs["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
        return self.ctx.make_params(kwargs, prompt_len, req.max_tokens, "prompt", constraint)

    def _logprobs(self, token_ids: list[int], entries: list[PositionLogprobs | None],
                  offset: int) -> tuple[CompletionLogProbs, int]:
        """The legacy logprobs object for ``token_ids``, whose text starts at ``offset``
        of the choice's text; returns it and the offset after the last token."""
        lp = CompletionLogProbs()
        for tid, entry in zip(token_ids, entries, strict=True):
            if entry is None:  # the first prompt token has no logprob
                text = self.ctx.tokenizer.decode([tid], skip_special_tokens=False)
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                text = entry[tid].decoded_token or ""
                lp.token_logprobs.append(entry[tid].logprob)
                ranked = sorted(entry.values(), key=lambda e: (e.rank or 0, -e.logprob))
                lp.top_logprobs.append({e.decoded_token or "": e.logprob for e in ranked})
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    def _echo_logprobs(self, out: RequestOutput) -> tuple[CompletionLogProbs, int]:
        return self._logprobs(out.prompt_token_ids, out.prompt_logprobs or [], 0)

    def _response(self, req: CompletionRequest, request_id: str,
                  prompts: list[tuple[str, list[int]]],
                  final: dict[int, RequestOutput]) -> CompletionResponse:
        choices = []
        outputs = [final[i] for i in range(len(prompts))]
        for i, out in enumerate(outputs):
            prompt_text = prompts[i][0] if req.echo else ""
            for o in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs, offset = (self._echo_logprobs(out) if req.echo
                                        else (CompletionLogProbs(), 0))
                    gen, _ = self._logprobs(o.token_ids, o.logprobs or [], offset)
                    for name in CompletionLogProbs.model_fields:
                        getattr(logprobs, name).extend(getattr(gen, name))
                choices.append(CompletionChoice(
                    index=i * req.n + o.index, text=prompt_text + o.text, logprobs=logprobs,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    prompt_logprobs=(prompt_logprobs_json(out.prompt_logprobs)
                                     if req.prompt_logprobs is not None else None)))
        return CompletionResponse(id=request_id, model=self.ctx.model_name, choices=choices,
                                  usage=usage(outputs))

    async def _frames(self, req: CompletionRequest, request_id: str,
                      prompts: list[tuple[str, list[int]]], streams: EngineStreams
                      ) -> AsyncIterator[str]:
        """One chunk per choice per engine step that changed it; finish_reason only on
        a choice's last chunk; then the usage chunk if asked for."""
        created = int(time.time())
        exclude: dict[str, Any] = {"choices": {"__all__": {"prompt_logprobs"}}}
        if not req.include_usage:
            exclude["usage"] = True
        states: dict[int, _ChoiceState] = {}
        final: dict[int, RequestOutput] = {}
        async for i, out in streams:
            for o in out.outputs:
                index = i * req.n + o.index
                st = states.setdefault(index, _ChoiceState())
                if st.done:
                    continue
                text, new_ids = o.text[st.text_len:], o.token_ids[st.num_tokens:]
                wants_logprobs = req.logprobs is not None and new_ids
                if not text and not o.finish_reason and not wants_logprobs:
                    continue
                logprobs = CompletionLogProbs() if req.logprobs is not None else None
                if not st.started and req.echo:
                    text = prompts[i][0] + text
                    if logprobs is not None:
                        logprobs, st.text_offset = self._echo_logprobs(out)
                if logprobs is not None:
                    gen, st.text_offset = self._logprobs(
                        new_ids, (o.logprobs or [])[st.num_tokens:len(o.token_ids)],
                        st.text_offset)
                    for name in CompletionLogProbs.model_fields:
                        getattr(logprobs, name).extend(getattr(gen, name))
                st.started, st.done = True, o.finish_reason is not None
                st.text_len, st.num_tokens = len(o.text), len(o.token_ids)
                chunk = CompletionResponse(
                    id=request_id, created=created, model=self.ctx.model_name,
                    choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=o.finish_reason,
                                              stop_reason=o.stop_reason)])
                yield sse_frame(chunk.model_dump_json(exclude=exclude))
            if out.finished:
                final[i] = out
        if req.include_usage:
            chunk = CompletionResponse(id=request_id, created=created,
                                       model=self.ctx.model_name, choices=[],
                                       usage=usage(list(final.values())))
            yield sse_frame(chunk.model_dump_json())
