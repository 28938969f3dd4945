"""Tool calls in chat replies: the whole message, or its stream of deltas.

Both go through ``tokenmill.tool_calling.parser``, so the deltas of a streamed reply add up to
the non-streamed message: the same content and the same calls with the same argument
text (only the call ids differ between two responses). A reply that made calls and
ended normally has ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

from tokenmill.server.constraints import ToolSetup
from tokenmill.server.protocol_structured import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from tokenmill.tool_calling.parser import ToolCallStream, new_call_id, parse_tool_output


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and reason == "stop" else reason


def tool_reply(text: str, setup: ToolSetup) -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a finished reply; content is None when only calls came."""
    parsed = parse_tool_output(text, True, set(setup.tool_names))
    calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name,
                                                              arguments=c.arguments))
             for c in parsed.calls]
    return (parsed.content if parsed.content or not calls else None), calls


class ToolDeltaStream:
    """One streamed choice of a request with tools."""

    def __init__(self, setup: ToolSetup) -> None:
        self.stream = ToolCallStream(set(setup.tool_names))

    def update(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        content, deltas = self.stream.update(text, final)
        return content, [DeltaToolCall(index=d.index, id=d.id, function=DeltaFunctionCall(
            name=d.name, arguments=d.arguments if d.arguments or d.id else None))
            for d in deltas]

    @property
    def made_calls(self) -> bool:
        return self.stream.num_calls > 0
