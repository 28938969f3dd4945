"""POST /v1/chat/completions: a completion whose prompt is a conversation.

The messages are rendered with the model's own chat template (``add_generation_prompt``
opens the assistant's turn) and the result is tokenized *without* adding special tokens
again: templates write BOS themselves when the model needs it. Only the template's own
markup becomes special tokens: special-token text inside the messages (``<|im_end|>`` typed
by a user, to forge a system turn) is tokenized as plain text (``Tokenizer.encode_chat``),
unless the operator allows it (``--allow-special-tokens-in-content``). Rendering and
tokenizing run off the event loop. From there it is one engine request with ``n``
completions, answered in the chat shapes:

* non-streaming: ``choices[i].message = {"role": "assistant", "content": ...}``;
* streaming: per choice, a first chunk with ``delta: {"role": "assistant",
  "content": ""}``, then content deltas, then ``finish_reason`` on its last chunk; with
  ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a final
  chunk with ``"choices": []`` carries the usage.

With ``tools`` (and ``tool_choice`` other than none) the template sees the tools, the
grammar keeps calls valid or forces them, and replies are parsed for calls into
``message.tool_calls`` / ``delta.tool_calls`` (``chat_reply``).

With ``--reasoning-parser`` a reply's ``<think>`` block goes into
``message.reasoning_content`` (streamed as ``delta.reasoning_content``), tool calls and
content are read from what follows it, and a constraint (response_format, tools) applies
after ``</think>`` (``tokenmill.reasoning``). ``chat_template_kwargs`` with
``enable_thinking: false`` turns the parsing off for that request.

Logprobs use the chat shape: ``logprobs.content`` is one entry per generated token,
``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}`` with the
``top_logprobs`` most likely tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.outputs import PositionLogprobs, RequestOutput
from tokenmill.reasoning import after_reasoning, reasoning_mode
from tokenmill.server.chat_reply import ReplySetup, ReplyStream, final_reply
from tokenmill.server.constraints import (
    Constraint,
    ToolSetup,
    request_constraint,
    resolve_tools,
)
from tokenmill.server.errors import invalid_request
from tokenmill.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
)
from tokenmill.server.serving_context import (
    ServingContext,
    StreamedChoice,
    json_response,
    prompt_logprobs_json,
    usage,
)
from tokenmill.server.sse import EngineStreams, EventStreamResponse, sse_frame
from tokenmill.server.tool_call_output import finish_reason
from tokenmill.tokenizer import Tokenizer
from tokenmill.tool_calling.prompt import template_messages

# the prompt's last tokens decoded to tell whether the template opened a think block
PROMPT_TAIL_TOKENS = 8


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[ChatMessage],
                    add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None,
                    add_special_tokens: bool = False,
                    tools: list[dict[str, Any]] | None = None,
                    special_tokens_in_content: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template (in a worker
    thread: it takes time proportional to the conversation)."""
    msgs, tools = template_messages([m.for_template() for m in messages], tools,
                                    tokenizer.chat_template_knows_tools)
    try:
        return tokenizer.encode_chat(msgs, add_generation_prompt, tools, template_kwargs,
                                     add_special_tokens=add_special_tokens,
                                     special_tokens_in_text=special_tokens_in_content)
    except ValueError as e:  # no template, or the template rejected the conversation
        raise invalid_request(str(e), "messages") from e


def _top(token: int, lp) -> ChatTopLogprob:
    text = lp.decoded_token or ""
    return ChatTopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()))


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs],
                  top_n: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = _top(tid, entry[tid])
        ranked = sorted((e for e in entry.items() if (e[1].rank or 0) <= top_n),
                        key=lambda e: (e[1].rank or 0, -e[1].logprob))
        content.append(ChatTokenLogprob(**chosen.model_dump(),
                                        top_logprobs=[_top(t, lp) for t, lp in ranked]))
    return ChatLogprobs(content=content)


def reasoning_setup(ctx: ServingContext, parser: str | None, prompt_ids: list[int],
                    template_kwargs: dict[str, Any] | None,
                    tools: ToolSetup) -> tuple[ReplySetup, Constraint | None]:
    """How replies are read with ``--reasoning-parser`` (where they start, from the
    prompt's last tokens), and the constraint moved after the think block: a structural
    tag the client wrote describes the whole reply and stays as it is."""
    tail = ctx.tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], False) if parser else ""
    mode = reasoning_mode(parser, tail, template_kwargs)
    constraint = tools.constraint
    if (constraint is not None and mode != "off"
            and (constraint.param == "tools" or constraint.params.kind != "structural_tag")):
        constraint = Constraint(after_reasoning(constraint.params, mode), constraint.param)
    return ReplySetup(tools, mode), constraint


@dataclass
class ChatRun:
    """A started chat request: its id, how its replies are read, its engine streams."""

    request_id: str
    setup: ReplySetup
    streams: EngineStreams


class ChatHandler:
    def __init__(self, ctx: ServingContext, reasoning_parser: str | None = None) -> None:
        self.ctx = ctx
        self.reasoning_parser = reasoning_parser

    async def start(self, req: ChatCompletionRequest, id_prefix: str = "chatcmpl") -> ChatRun:
        """Checks, renders, tokenizes and starts ``req`` (also the Responses API's path)."""
        ctx = self.ctx
        ctx.check_request(req.model, req.stream, req.prompt_logprobs, req.priority)
        tools = resolve_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                              request_constraint(req))
        ctx.admit(req.n, "n")  # before the tokenizing work, if the queue is full anyway
        ids = await ctx.off_loop(
            chat_prompt_ids, ctx.tokenizer, req.messages, req.add_generation_prompt,
            req.chat_template_kwargs, False, tools.template_tools,
            ctx.limits.allow_special_tokens_in_content)
        ctx.check_token_ids(ids, "messages")
        setup, constraint = reasoning_setup(ctx, self.reasoning_parser, ids,
                                            req.chat_template_kwargs, tools)
        kwargs = req.sampling_kwargs()
        kwargs["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = ctx.make_params(kwargs, len(ids), max_tokens, "messages", constraint)
        await ctx.check_constraint(constraint)
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        streams = await ctx.start(request_id, [ids], [params], req.priority)
        return ChatRun(request_id, setup, streams)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        run = await self.start(req)
        if req.stream:
            return EventStreamResponse(self._frames(req, run.setup, run.request_id,
                                                    run.streams), run.streams)
        out = (await self.ctx.run(raw, run.streams))[0]
        return json_response(self._response(req, run.setup, run.request_id, out))

    def _response(self, req: ChatCompletionRequest, setup: ReplySetup, request_id: str,
                  out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for o in out.outputs:
            reply = final_reply(o.text, setup)
            choices.append(ChatChoice(
                index=o.index, message=ChatResponseMessage(
                    content=reply.content, reasoning_content=reply.reasoning,
                    tool_calls=reply.calls or None),
                logprobs=(chat_logprobs(o.token_ids, o.logprobs or [], req.top_logprobs or 0)
                          if req.logprobs else None),
                finish_reason=finish_reason(o.finish_reason, bool(reply.calls)),
                stop_reason=o.stop_reason))
        return ChatCompletionResponse(
            id=request_id, model=self.ctx.model_name, choices=choices, usage=usage([out]),
            prompt_logprobs=(prompt_logprobs_json(out.prompt_logprobs)
                             if req.prompt_logprobs is not None else None))

    async def _frames(self, req: ChatCompletionRequest, setup: ReplySetup, request_id: str,
                      streams: EngineStreams) -> AsyncIterator[str]:
        created = int(time.time())
        exclude = None if req.include_usage else {"usage"}

        def frame(choice: ChatStreamChoice) -> str:
            chunk = ChatCompletionChunk(id=request_id, created=created,
                                        model=self.ctx.model_name, choices=[choice])
            return sse_frame(chunk.model_dump_json(exclude=exclude))

        for index in range(req.n):
            yield frame(ChatStreamChoice(index=index,
                                         delta=DeltaMessage(role="assistant", content="")))
        sent = [StreamedChoice() for _ in range(req.n)]
        parsers = [ReplyStream(setup) for _ in range(req.n)]
        last: RequestOutput | None = None
        async for _, out in streams:
            last = out
            for o in out.outputs:
                j = o.index
                if sent[j].done:
                    continue
                new_ids = sent[j].new_token_ids(o)
                reasoning, text, calls = parsers[j].update(o.text, o.finish_reason is not None)
                reason = finish_reason(o.finish_reason, parsers[j].made_calls)
                if (not text and not reasoning and not calls and not reason
                        and not (req.logprobs and new_ids)):
                    continue
                logprobs = None
                if req.logprobs:
                    logprobs = chat_logprobs(new_ids, sent[j].new_logprobs(o),
                                             req.top_logprobs or 0)
                sent[j].mark_sent(o, reason is not None)
                content = text if text or not (sent[j].done or calls or reasoning) else None
                delta = DeltaMessage(content=content, reasoning_content=reasoning or None,
                                     tool_calls=calls or None)
                yield frame(ChatStreamChoice(index=j, delta=delta, logprobs=logprobs,
                                             finish_reason=reason,
                                             stop_reason=o.stop_reason))
        if req.include_usage and last is not None:
            chunk = ChatCompletionChunk(id=request_id, created=created,
                                        model=self.ctx.model_name, choices=[],
                                        usage=usage([last]))
            yield sse_frame(chunk.model_dump_json())
