"""One assistant reply read out of the model's text: reasoning, content and tool calls.

The reasoning split (``tokenmill.reasoning``) comes first; the tool-call parser reads only
the content after it, so a ``<tool_call>`` inside the thoughts is not a call. The whole
reply (``final_reply``) and a streamed one (``ReplyStream``) go through the same
functions, so the streamed pieces add up to the whole: the same reasoning, the same
content, the same calls with the same argument text.

``reasoning_content`` is None when the reply had no think block; content is None when a
think block (or only tool calls) left nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.reasoning import ReasoningMode, ReasoningStream, split_reasoning
from tokenmill.server.constraints import ToolSetup
from tokenmill.server.protocol_structured import DeltaToolCall, ToolCall
from tokenmill.server.tool_call_output import ToolDeltaStream, tool_reply


@dataclass(frozen=True)
class ReplySetup:
    """How the replies of one request are read."""

    tools: ToolSetup
    reasoning: ReasoningMode = "off"


@dataclass(frozen=True)
class Reply:
    reasoning: str | None
    content: str | None
    calls: list[ToolCall]


def final_reply(text: str, setup: ReplySetup) -> Reply:
    split = split_reasoning(text, True, setup.reasoning)
    content: str | None = split.content
    calls: list[ToolCall] = []
    if setup.tools.parse_calls:
        content, calls = tool_reply(split.content, setup.tools)
    if split.has_reasoning:
        return Reply(split.reasoning, content or None, calls)
    return Reply(None, content, calls)


class ReplyStream:
    """One streamed choice: ``update(text_so_far, final)`` returns the new reasoning text,
    the new content text and the new tool-call pieces."""

    def __init__(self, setup: ReplySetup) -> None:
        self.reasoning = ReasoningStream(setup.reasoning)
        self.tools = ToolDeltaStream(setup.tools) if setup.tools.parse_calls else None
        self.content_sent = 0

    def update(self, text: str, final: bool) -> tuple[str, str, list[DeltaToolCall]]:
        reasoning, content = self.reasoning.update(text, final)
        if self.tools is not None:
            new, calls = self.tools.update(content, final)
            return reasoning, new, calls
        new = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        return reasoning, new, []

    @property
    def made_calls(self) -> bool:
        return self.tools is not None and self.tools.made_calls
