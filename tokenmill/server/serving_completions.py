"""POST /v1/completions.

A completion request may carry k prompts (strings or token ids) and ask for n choices
each; it becomes k engine requests with ``SamplingParams(n=n)``, and choice
``prompt_index * n + i`` is completion i of prompt ``prompt_index`` (OpenAI's order).

Everything a client can get wrong is checked before the engine sees the request:
the model name, the prompt (empty, out-of-vocabulary ids, too long for the context), the
sampling values (``SamplingParams`` raises ValueError naming the field) and the token
ids in ``logit_bias`` / ``stop_token_ids``. ``max_tokens`` defaults to what is left of the
context after the prompt, as in vLLM; asking for more than that is a 400. Prompts are
tokenized off the event loop. A prompt is the user's own text: special-token text in it
is read as special tokens (unlike chat messages).

Streams send, per choice, what is new since the last chunk (``StreamedChoice``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.outputs import PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.constraints import Constraint, request_constraint
from tokenmill.server.errors import invalid_request
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from tokenmill.server.serving_context import (
    ServingContext,
    StreamedChoice,
    json_response,
    prompt_logprobs_json,
    usage,
)
from tokenmill.server.sse import EngineStreams, EventStreamResponse, sse_frame


class CompletionHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_request(req.model, req.stream, req.prompt_logprobs, req.priority)
        constraint = request_constraint(req)
        ctx.admit(len(req.prompts()) * req.n, "prompt" if req.n == 1 else "n")
        prompts = await ctx.off_loop(lambda: [self._tokenize(p) for p in req.prompts()])
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
            try:
                ids = tok.encode(prompt)
            except ValueError as e:  # not valid Unicode
                raise invalid_request(f"Invalid value for 'prompt': {e}", "prompt") from e
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
        states: dict[int, StreamedChoice] = {}
        text_offsets: dict[int, int] = {}  # where each choice's next logprobs token starts
        final: dict[int, RequestOutput] = {}
        async for i, out in streams:
            for o in out.outputs:
                index = i * req.n + o.index
                st = states.setdefault(index, StreamedChoice())
                if st.done:
                    continue
                text, new_ids = st.new_text(o), st.new_token_ids(o)
                wants_logprobs = req.logprobs is not None and new_ids
                if not text and not o.finish_reason and not wants_logprobs:
                    continue
                logprobs = CompletionLogProbs() if req.logprobs is not None else None
                if not st.started and req.echo:
                    text = prompts[i][0] + text
                    if logprobs is not None:
                        logprobs, text_offsets[index] = self._echo_logprobs(out)
                if logprobs is not None:
                    gen, text_offsets[index] = self._logprobs(
                        new_ids, st.new_logprobs(o), text_offsets.get(index, 0))
                    for name in CompletionLogProbs.model_fields:
                        getattr(logprobs, name).extend(getattr(gen, name))
                st.mark_sent(o, o.finish_reason is not None)
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
