"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API on the chat
path.

A request becomes a chat completion: ``instructions`` a system message, then the stored
conversation of ``previous_response_id`` (if any), then the input items as chat messages
(``function_call`` items become an assistant turn's ``tool_calls``,
``function_call_output`` items ``tool`` messages; reasoning items are dropped). Tools,
``tool_choice``, ``text.format`` (json_schema / json_object), ``max_output_tokens``,
temperature and top_p map to their chat fields, and ``ChatHandler.start`` does the rest
(template, tokenizing, checks, constraints, ``--reasoning-parser``). The reply is read
with the chat path's ``chat_reply`` into output items: a ``reasoning`` item (the think
block), a ``message`` with one ``output_text`` part, and ``function_call`` items.

Streaming sends OpenAI's events, each with a growing ``sequence_number``:
``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, its content (``response.content_part.added``,
``response.output_text.delta``... or ``response.reasoning_text.delta``...,
``response.output_text.done`` / ``response.reasoning_text.done``,
``response.content_part.done``; for a call ``response.function_call_arguments.delta``...
and ``.done``), ``response.output_item.done``, and last ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it short) with the whole response.

``store`` (the default, as at OpenAI) keeps the response and its conversation in memory
(``response_store``); a stream is stored once it has ended.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tokenmill.outputs import RequestOutput
from tokenmill.server.chat_reply import ReplyStream, final_reply
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.server.protocol_responses import (
    DeletedResponse,
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from tokenmill.server.protocol_structured import (
    ChatTool,
    FunctionDefinition,
    JsonSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
)
from tokenmill.server.response_store import ResponseStore, response_not_found
from tokenmill.server.serving_chat import ChatHandler
from tokenmill.server.serving_context import json_response, usage
from tokenmill.server.sse import EventStreamResponse

# ---- request -> chat ---------------------------------------------------------------------


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """The input as chat messages (plain dicts, as stored for later turns)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion a Responses request stands for (never streamed: the caller
    turns the engine's outputs into events itself)."""
    tools = [ChatTool(function=FunctionDefinition(
        name=t.name, description=t.description, parameters=t.parameters, strict=t.strict))
        for t in req.tools or []] or None
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = NamedToolChoice(function=NamedFunction(name=choice.name))
    fmt = req.text.format if req.text is not None else None
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = ResponseFormat(type="json_object")
    elif fmt is not None and fmt.type == "json_schema":
        response_format = ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(
            name=fmt.name, schema=fmt.schema_, description=fmt.description,
            strict=fmt.strict))
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    return ChatCompletionRequest(
        model=req.model, messages=[ChatMessage.model_validate(m) for m in system + messages],
        max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, tools=tools, tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls, response_format=response_format,
        chat_template_kwargs=req.chat_template_kwargs)


def output_messages(output: list[OutputItem]) -> list[dict[str, Any]]:
    """A response's output as the chat messages a later turn continues from."""
    content = "".join(p.text for item in output if isinstance(item, OutputMessage)
                      for p in item.content)
    calls = [{"id": item.call_id, "type": "function",
              "function": {"name": item.name, "arguments": item.arguments}}
             for item in output if isinstance(item, FunctionCallOutput)]
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return [message] if content or calls else []


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


# ---- the handler -------------------------------------------------------------------------


@dataclass
class _Started:
    """A started response: its shell (status in progress, no output) and the run."""

    shell: ResponseObject
    history: list[dict[str, Any]]   # the conversation before this response's output
    run: Any


class ResponsesHandler:
    def __init__(self, chat: ChatHandler, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        previous: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            previous = self.store.get(req.previous_response_id, "previous_response_id").messages
        history = previous + input_messages(req.input)
        run = await self.chat.start(chat_request(req, history), "resp")
        started = _Started(self._shell(req), history, run)
        if req.stream:
            return EventStreamResponse(self._events(req, started), run.streams)
        out = (await self.chat.ctx.run(raw, run.streams))[0]
        c = out.outputs[0]
        reply = final_reply(c.text, run.setup)
        status = _status(c.finish_reason)
        items: list[OutputItem] = []
        if reply.reasoning:  # as streamed: an empty think block makes no item
            items.append(ReasoningItem(id=_new_id("rs"), status=status,
                                       content=[ReasoningText(text=reply.reasoning)]))
        if reply.content or not (items or reply.calls):
            items.append(OutputMessage(id=_new_id("msg"), status=status,
                                       content=[OutputText(text=reply.content or "")]))
        items += [FunctionCallOutput(id=_new_id("fc"), call_id=call.id,
                                     name=call.function.name,
                                     arguments=call.function.arguments, status=status)
                  for call in reply.calls]
        return json_response(self._finish(req, started, items, out,
                                          await self._reasoning_tokens(items)))

    def _shell(self, req: ResponsesRequest) -> ResponseObject:
        fmt = req.text.format if req.text is not None and req.text.format else None
        return ResponseObject(
            id=_new_id("resp"), status="in_progress", instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, model=self.chat.ctx.model_name,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, store=req.store,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True)
                  if fmt else {"type": "text"}},
            tool_choice=(req.tool_choice.model_dump() if req.tool_choice is not None
                         and not isinstance(req.tool_choice, str)
                         else req.tool_choice or "auto"),
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            metadata=req.metadata or {}, user=req.user)

    async def _reasoning_tokens(self, items: list[OutputItem]) -> int:
        """Tokens of the reasoning text (re-tokenized, off the event loop: the count the
        model spent on thoughts, give or take the tags)."""
        text = "".join(part.text for item in items if isinstance(item, ReasoningItem)
                       for part in item.content)
        if not text:
            return 0
        tok = self.chat.ctx.tokenizer
        return len(await self.chat.ctx.off_loop(tok.encode, text, False))

    def _finish(self, req: ResponsesRequest, started: _Started, items: list[OutputItem],
                out: RequestOutput, reasoning_tokens: int) -> ResponseObject:
        """The finished response (stored if asked)."""
        reason = out.outputs[0].finish_reason
        u = usage([out])
        response = started.shell.model_copy(update=dict(
            status=_status(reason), output=items,
            incomplete_details=(IncompleteDetails(reason="max_output_tokens")
                                if reason == "length" else None),
            usage=ResponseUsage(
                input_tokens=u.prompt_tokens,
                input_tokens_details=InputTokensDetails(
                    cached_tokens=u.prompt_tokens_details.cached_tokens
                    if u.prompt_tokens_details else 0),
                output_tokens=u.completion_tokens,
                output_tokens_details=OutputTokensDetails(
                    reasoning_tokens=min(reasoning_tokens, u.completion_tokens)),
                total_tokens=u.total_tokens)))
        if req.store:
            self.store.put(response.model_dump(mode="json"),
                           started.history + output_messages(items))
        return response

    async def _events(self, req: ResponsesRequest, started: _Started) -> AsyncIterator[str]:
        events = _EventWriter(started.shell)
        yield events.emit("response.created", response=started.shell.model_dump(mode="json"))
        yield events.emit("response.in_progress",
                          response=started.shell.model_dump(mode="json"))
        parser = ReplyStream(started.run.setup)
        last: RequestOutput | None = None
        async for _, out in started.run.streams:
            last = out
            c = out.outputs[0]
            final = c.finish_reason is not None
            reasoning, content, calls = parser.update(c.text, final)
            for frame in events.reasoning(reasoning):
                yield frame
            for frame in events.text(content):
                yield frame
            for call in calls:
                for frame in events.call(call.id, call.function.name,
                                         call.function.arguments):
                    yield frame
            if final:
                break
        if last is None:
            return
        status = _status(last.outputs[0].finish_reason)
        for frame in events.close(status, ensure_message=True):
            yield frame
        response = self._finish(req, started, events.items, last,
                                await self._reasoning_tokens(events.items))
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        yield events.emit(kind, response=response.model_dump(mode="json"))

    async def retrieve(self, response_id: str) -> Response:
        entry = self.store.get(response_id)
        return Response(json.dumps(entry.response, ensure_ascii=False),
                        media_type="application/json")

    async def delete(self, response_id: str) -> Response:
        if not self.store.delete(response_id):
            raise response_not_found(response_id)
        return json_response(DeletedResponse(id=response_id))


@dataclass
class _EventWriter:
    """Turns reply pieces into Responses stream events, opening and closing output items
    as the kind of piece changes (reasoning, text, a call)."""

    shell: ResponseObject
    items: list[OutputItem] = field(default_factory=list)
    sequence: int = 0
    open_kind: str | None = None   # "reasoning", "message" or "call"
    open_text: str = ""            # what the open item holds so far

    def emit(self, kind: str, **payload: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": self._index}

    def _open(self, kind: str, item: OutputItem) -> list[str]:
        frames = self.close("completed")
        self.items.append(item)
        self.open_kind, self.open_text = kind, ""
        frames.append(self.emit("response.output_item.added", output_index=self._index,
                                item=item.model_dump(mode="json")))
        if kind != "call":
            part = ({"type": "reasoning_text", "text": ""} if kind == "reasoning"
                    else OutputText(text="").model_dump(mode="json"))
            frames.append(self.emit("response.content_part.added", content_index=0,
                                    part=part, **self._where()))
        return frames

    def reasoning(self, delta: str) -> list[str]:
        return self._piece("reasoning", delta)

    def text(self, delta: str) -> list[str]:
        return self._piece("message", delta)

    def _piece(self, kind: str, delta: str) -> list[str]:
        """Reasoning or answer text: into the open item of that kind, or a new one."""
        if not delta:
            return []
        frames: list[str] = []
        if self.open_kind != kind:
            item = (ReasoningItem(id=_new_id("rs"), status="in_progress", content=[])
                    if kind == "reasoning" else
                    OutputMessage(id=_new_id("msg"), status="in_progress", content=[]))
            frames = self._open(kind, item)
        self.open_text += delta
        if kind == "reasoning":
            frames.append(self.emit("response.reasoning_text.delta", content_index=0,
                                    delta=delta, **self._where()))
        else:
            frames.append(self.emit("response.output_text.delta", content_index=0,
                                    delta=delta, logprobs=[], **self._where()))
        return frames

    def call(self, call_id: str | None, name: str | None, arguments: str | None) -> list[str]:
        """A piece of a call: its id and name start a new call item."""
        frames: list[str] = []
        if call_id is not None:  # a new call
            frames = self._open("call", FunctionCallOutput(
                id=_new_id("fc"), call_id=call_id, name=name or "", arguments="",
                status="in_progress"))
        if arguments:
            self.open_text += arguments
            frames.append(self.emit("response.function_call_arguments.delta", delta=arguments,
                                    **self._where()))
        return frames

    def close(self, status: str, ensure_message: bool = False) -> list[str]:
        """Ends the open item (if any) with ``status``; with ``ensure_message``, a reply
        that produced nothing at all still gets an (empty) message."""
        frames: list[str] = []
        if ensure_message and not self.items:
            frames += self._open("message", OutputMessage(id=_new_id("msg"),
                                                          status="in_progress", content=[]))
        if self.open_kind is None:
            return frames
        item, where, text = self.items[-1], self._where(), self.open_text
        if isinstance(item, ReasoningItem | OutputMessage):
            reasoning = isinstance(item, ReasoningItem)
            part = ReasoningText(text=text) if reasoning else OutputText(text=text)
            done = item.model_copy(update=dict(status=status, content=[part]))
            kind, extra = (("response.reasoning_text.done", {}) if reasoning
                           else ("response.output_text.done", {"logprobs": []}))
            frames.append(self.emit(kind, content_index=0, text=text, **extra, **where))
            frames.append(self.emit("response.content_part.done", content_index=0,
                                    part=part.model_dump(mode="json"), **where))
        else:
            done = item.model_copy(update=dict(status=status, arguments=text))
            frames.append(self.emit("response.function_call_arguments.done", arguments=text,
                                    name=done.name, **where))
        self.items[-1] = done
        frames.append(self.emit("response.output_item.done", output_index=self._index,
                                item=done.model_dump(mode="json")))
        self.open_kind, self.open_text = None, ""
        return frames


def add_responses_routes(app: FastAPI, chat: ChatHandler, store: ResponseStore) -> None:
    """Registers POST /v1/responses and GET / DELETE /v1/responses/{response_id}."""
    handler = ResponsesHandler(chat, store)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, raw: Request) -> Response:
        return await handler.create(body, raw)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Response:
        return await handler.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        return await handler.delete(response_id)
