"""Tools and tool messages, as the chat template gets them.

A chat template that knows tools (it reads the ``tools`` variable, as Qwen's, Llama 3.1's
and Hermes' do) gets the tool list and the messages the way ``transformers`` hands them
over; the one change is that the ``arguments`` of an assistant's earlier ``tool_calls``,
which OpenAI sends as JSON text, are turned back into objects, since templates print them
with ``tojson``.

A template that does not (SmolLM2's, for one) would silently drop all of it, and the
model would never hear of the tools. For those, the conversation is rewritten into plain
messages the template can render: the tool list and the calling convention go into the
system message, earlier calls become ``<tool_call>`` text in the assistant's turn, and tool
results become user turns wrapped in ``<tool_response>``.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.tool_calling.parser import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

TOOLS_INSTRUCTIONS = (
    "You can call functions to help answer. These are the available functions, one JSON "
    "signature per line, inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with its name and arguments as a JSON object inside "
    "<tool_call></tool_call> tags:\n"
    f"{TOOL_CALL_OPEN}\n"
    '{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
    f"{TOOL_CALL_CLOSE}"
)


def _arguments_as_object(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            function["arguments"] = json.loads(args)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            pass  # leave what the client sent
    return {**call, "function": function}


def _call_text(call: dict[str, Any]) -> str:
    function = _arguments_as_object(call)["function"]
    body = json.dumps({"name": function.get("name"), "arguments": function.get("arguments",
                                                                               {})},
                      ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      template_knows_tools: bool
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render for a conversation; see the module docstring."""
    if template_knows_tools:
        out = [{**m, "tool_calls": [_arguments_as_object(c) for c in m["tool_calls"]]}
               if m.get("tool_calls") else m for m in messages]
        return out, tools
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{m.get('content') or ''}\n"
                                   "</tool_response>"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            parts += [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        instructions = TOOLS_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out, None
