"""Tool calls out of the model's text, the same whether the text is whole or streamed.

Two formats are recognised:

* tagged (Hermes / Qwen, and what ``tool_choice`` forces through the grammar):
  ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, any number of them, with
  ordinary text around them;
* plain JSON (Llama 3 style): the whole reply is ``{"name": "f", "arguments"|"parameters":
  {...}}`` or a list of those, and ``f`` is one of the request's tools.

``parse_tool_output(text, final)`` reads the text generated so far and returns only what
cannot change any more: content that is certainly not the start of a tag, a call once its
name is complete, and a call's arguments as the raw JSON text read so far. Everything it
returns for a prefix of the text is a prefix of what it returns for the whole text, so a
stream can send the differences (``ToolCallStream``) and the pieces add up to exactly the
non-streamed answer. Content is trimmed of surrounding whitespace (trailing whitespace is
held back until something follows it). A call's ``arguments`` is the JSON text the model
wrote for them (a JSON-encoded string is decoded); a call block without a name is dropped.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class ParsedOutput:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


# ---- a small JSON scanner: where things are, not what they are ---------------------------


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """``s[i]`` is a quote: the index after the closing quote, or None if unfinished."""
    i += 1
    while i < len(s):
        if s[i] == "\\":
            i += 2
        elif s[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """The index after the JSON value starting at ``s[i]``, or None if unfinished."""
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] in "{[":
        depth = 0
        while i < len(s):
            c = s[i]
            if c == '"':
                end = _string_end(s, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(s) else None  # a number or literal ends only when something follows


@dataclass
class _Object:
    """The top-level members of one JSON object, read as far as the text goes."""

    values: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> span
    end: int | None = None   # index after the closing brace, once closed
    broken: bool = False     # not JSON: stop reading


def _scan_object(s: str, i: int) -> _Object:
    """``s[i]`` is ``{``. Reads members until the text ends or the object closes."""
    obj = _Object()
    i = _skip_ws(s, i + 1)
    while i < len(s):
        if s[i] == "}":
            obj.end = i + 1
            return obj
        if s[i] != '"':
            obj.broken = True
            return obj
        key_end = _string_end(s, i)
        if key_end is None:
            return obj
        try:
            key = json.loads(s[i:key_end])
        except json.JSONDecodeError:
            obj.broken = True
            return obj
        i = _skip_ws(s, key_end)
        if i >= len(s):
            return obj
        if s[i] != ":":
            obj.broken = True
            return obj
        i = _skip_ws(s, i + 1)
        if i >= len(s):
            return obj
        end = _value_end(s, i)
        obj.values[key] = (i, end)
        if end is None:
            return obj
        i = _skip_ws(s, end)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
        elif i < len(s) and s[i] != "}":
            obj.broken = True
            return obj
    return obj


def _call_from(s: str, obj: _Object, closed: bool) -> ParsedCall | None:
    """The call an object describes so far, once its name is known."""
    span = obj.values.get("name")
    if span is None or span[1] is None or s[span[0]] != '"':
        return None
    name = json.loads(s[span[0]:span[1]])
    call = ParsedCall(name=name, complete=closed)
    for key in _ARGUMENT_KEYS:
        if key in obj.values:
            start, end = obj.values[key]
            if end is None:  # still being written: stream objects and lists as they grow
                call.arguments = s[start:] if s[start] in "{[" else ""
            elif s[start] == '"':
                decoded = json.loads(s[start:end])
                call.arguments = decoded if isinstance(decoded, str) else s[start:end]
            else:
                call.arguments = s[start:end]
            break
    else:
        if obj.end is not None or closed:
            call.arguments = "{}"
    return call


# ---- the two formats -------------------------------------------------------------------


def _without_partial(text: str, tag: str) -> str:
    """``text`` less its longest suffix that could be the beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return text[:-n]
    return text


def _tagged(text: str, final: bool) -> tuple[list[str], list[ParsedCall]]:
    content: list[str] = []
    calls: list[ParsedCall] = []
    i = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, i)
        if start < 0:
            rest = text[i:]
            content.append(rest if final else _without_partial(rest, TOOL_CALL_OPEN))
            return content, calls
        content.append(text[i:start])
        body_start = start + len(TOOL_CALL_OPEN)
        close = text.find(TOOL_CALL_CLOSE, body_start)
        if close >= 0:
            body = text[body_start:close]
        else:
            body = text[body_start:]
            body = body if final else _without_partial(body, TOOL_CALL_CLOSE)
        j = _skip_ws(body, 0)
        if j < len(body) and body[j] == "{":
            call = _call_from(body, _scan_object(body, j), closed=close >= 0 or final)
            if call is not None:
                calls.append(call)
        if close < 0:
            return content, calls
        i = close + len(TOOL_CALL_CLOSE)


def _plain_json_decision(s: str, tool_names: set[str]) -> bool | None:
    """True if ``s`` (the reply, stripped) is a plain-JSON tool call, False if it is not,
    None while it cannot be told yet."""
    i = 0
    if s.startswith("["):
        i = _skip_ws(s, 1)
        if i >= len(s):
            return None
    if s[i] != "{":
        return False
    obj = _scan_object(s, i)
    if not obj.values:
        return False if obj.broken or obj.end is not None else None
    first = next(iter(obj.values))
    if first != "name":
        return False  # ordinary JSON
    start, end = obj.values["name"]
    if end is None:
        return None
    return s[start] == '"' and json.loads(s[start:end]) in tool_names


def _plain_json(s: str, final: bool) -> tuple[str, list[ParsedCall]]:
    """Calls of a reply that is a JSON object or list of objects; trailing text is content."""
    calls: list[ParsedCall] = []
    in_list = s.startswith("[")
    i = _skip_ws(s, 1) if in_list else 0
    while i < len(s) and s[i] == "{":
        obj = _scan_object(s, i)
        call = _call_from(s, obj, closed=obj.end is not None or final)
        if call is not None:
            calls.append(call)
        if obj.end is None or not in_list:
            i = obj.end if obj.end is not None else len(s)
            break
        i = _skip_ws(s, obj.end)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
        elif i < len(s) and s[i] == "]":
            i += 1
            break
    return s[i:], calls


def parse_tool_output(text: str, final: bool, tool_names: set[str] | None = None
                      ) -> ParsedOutput:
    """Content and tool calls of ``text`` (see the module docstring). ``tool_names``
    enables the plain-JSON format (calls to other names stay content)."""
    stripped = text.lstrip(_WS)
    if tool_names and stripped[:1] in ("{", "["):
        decision = _plain_json_decision(stripped, tool_names)
        if decision is None and not final:
            return ParsedOutput()
        if decision:
            rest, calls = _plain_json(stripped, final)
            return ParsedOutput(rest.strip(_WS), calls)
    pieces, calls = _tagged(text, final)
    # leading whitespace is never sent; trailing whitespace waits for what follows it
    return ParsedOutput("".join(pieces).strip(_WS), calls)


# ---- streaming -------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    """A piece of call ``index``: its id and name the first time, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Turns the growing text of one choice into content and tool-call deltas."""

    def __init__(self, tool_names: set[str] | None = None) -> None:
        self.tool_names = tool_names
        self.content_sent = 0
        self.calls_sent: list[tuple[str, int]] = []  # (name, argument chars) per call
        self.ids: list[str] = []

    def update(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        parsed = parse_tool_output(text, final, self.tool_names)
        content = parsed.content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(parsed.content))
        deltas = []
        for i, call in enumerate(parsed.calls):
            if i == len(self.calls_sent):
                self.calls_sent.append((call.name, 0))
                self.ids.append(new_call_id())
                deltas.append(ToolCallDelta(i, self.ids[i], call.name, ""))
            name, sent = self.calls_sent[i]
            if len(call.arguments) > sent:
                if deltas and deltas[-1].index == i:
                    deltas[-1].arguments = call.arguments[sent:]
                else:
                    deltas.append(ToolCallDelta(i, arguments=call.arguments[sent:]))
                self.calls_sent[i] = (name, len(call.arguments))
        return content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.calls_sent)
