"""Grammars that hold tool calls to the functions' JSON schemas (xgrammar structural tags).

Every call is written in the tagged format the parser reads::

    <tool_call>
    {"name": "get_weather", "arguments": {...arguments valid against its parameters...}}
    </tool_call>

* ``auto``: free text; once the model writes ``<tool_call>``, what follows must be a call
  to one of the tools with valid arguments (a "triggered tag"), then free text again;
* ``required``: one or more calls and nothing else (only one unless parallel calls are
  allowed);
* a named function: exactly one call to it.

The arguments get the same whitespace bound as other JSON outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.structured import DEFAULT_MAX_WHITESPACE, StructuredOutputsParams
from tokenmill.tool_calling.parser import TOOL_CALL_OPEN

CALL_BEGIN = TOOL_CALL_OPEN + '\n{"name": "{name}", "arguments": '
CALL_END = "}\n</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolChoice:
    """``tool_choice`` resolved: none, auto, required, or one named function."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"]


def _tag(function: dict[str, Any], max_whitespace: int | None) -> dict[str, Any]:
    return {
        "type": "tag",
        "begin": CALL_BEGIN.replace("{name}", function["name"]),
        "content": {"type": "json_schema",
                    "json_schema": function.get("parameters") or EMPTY_PARAMETERS,
                    "max_whitespace_cnt": max_whitespace},
        "end": CALL_END,
    }


def tool_call_constraint(tools: list[dict[str, Any]], choice: ToolChoice,
                         parallel_tool_calls: bool = True,
                         max_whitespace: int | None = DEFAULT_MAX_WHITESPACE,
                         ) -> StructuredOutputsParams | None:
    """The constraint for a request with ``tools``; None when nothing is constrained."""
    if not tools or choice.mode == "none":
        return None
    if choice.mode == "named":
        chosen = [function_of(t) for t in tools if function_of(t)["name"] == choice.name]
        fmt: dict[str, Any] = _tag(chosen[0], max_whitespace)
    else:
        tags = [_tag(function_of(t), max_whitespace) for t in tools]
        if choice.mode == "auto":
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags,
                   "stop_after_first": not parallel_tool_calls}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                   "at_least_one": True, "stop_after_first": not parallel_tool_calls}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt})
