"""From a request's constraint and tool fields to StructuredOutputsParams, or a 400.

``request_constraint`` reads the four spellings of a constraint (see
``protocol_structured``); more than one is a 400 naming the second. ``resolve_tools``
turns ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` into what the chat handler
needs: the tools the template sees, whether and how replies are parsed for calls, and the
grammar that forces calls (``required``, a named function) or keeps them valid (``auto``).
The constraint's own errors (a bad schema, a regex that does not parse) are found later,
when the engine parses it, and named after the field it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import invalid_request
from tokenmill.server.protocol_structured import ChatTool, NamedToolChoice, StructuredFields
from tokenmill.structured import StructuredOutputsParams
from tokenmill.tool_calling.grammar import ToolChoice, tool_call_constraint


@dataclass(frozen=True)
class Constraint:
    params: StructuredOutputsParams
    param: str  # the request field it came from, for error messages


def _make(fields: dict[str, Any], param: str) -> Constraint:
    try:
        return Constraint(StructuredOutputsParams(**fields), param)
    except ValueError as e:
        raise invalid_request(f"{param}: {e}", param) from e


def request_constraint(req: StructuredFields) -> Constraint | None:
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        found.append(("response_format", {"json": rf.json_schema.schema_}))
    elif rf is not None and rf.type == "structural_tag":
        found.append(("response_format", {"structural_tag": {"type": "structural_tag",
                                                             "format": rf.format}}))
    so = req.structured_outputs
    if so is not None:
        # unset fields (None) keep StructuredOutputsParams' defaults
        fields = so.model_dump(by_alias=True, exclude_none=True,
                               exclude={"disable_fallback", "disable_additional_properties",
                                        "backend"})
        found.append(("structured_outputs", fields))
    for name, field in (("guided_json", "json"), ("guided_regex", "regex"),
                        ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found.append((name, {field: value}))
    if not found:
        return None
    if len(found) > 1:
        raise invalid_request(f"only one constraint may be given; got {found[0][0]} and "
                              f"{found[1][0]}", found[1][0])
    param, fields = found[0]
    return _make(fields, param)


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request's tools mean for rendering, decoding and parsing."""

    template_tools: list[dict[str, Any]] | None  # None: the template does not see tools
    parse_calls: bool                             # look for tool calls in the replies
    tool_names: frozenset[str]
    constraint: Constraint | None


def resolve_tools(tools: list[ChatTool] | None, tool_choice: str | NamedToolChoice | None,
                  parallel_tool_calls: bool | None,
                  other: Constraint | None) -> ToolSetup:
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid_request("tool_choice needs tools", "tool_choice")
        return ToolSetup(None, False, frozenset(), other)
    dicts = [t.model_dump(exclude_none=True) for t in tools]
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid_request("tool function names must be unique", "tools")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise invalid_request(f"tool_choice names function {tool_choice.function.name!r}, "
                                  "which is not in tools", "tool_choice")
        choice = ToolChoice("named", tool_choice.function.name)
    else:
        choice = ToolChoice(tool_choice or "auto")
    if choice.mode == "none":
        return ToolSetup(None, False, frozenset(), other)
    if other is not None and choice.mode != "auto":
        raise invalid_request(f"{other.param} cannot be combined with tool_choice "
                              f"{tool_choice if isinstance(tool_choice, str) else 'function'}",
                              other.param)
    constraint = other
    if constraint is None:
        params = tool_call_constraint(dicts, choice, parallel_tool_calls is not False)
        constraint = Constraint(params, "tools")
    return ToolSetup(dicts, True, frozenset(names), constraint)
