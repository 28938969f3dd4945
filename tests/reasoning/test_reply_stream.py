"""A whole reply (reasoning, then content and tool calls) streamed in random pieces adds up
to the non-streamed reply: the property behind ``delta.reasoning_content`` and
``delta.tool_calls`` on chat and the reasoning / message / function_call items of the
Responses API."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.server.chat_reply import ReplySetup, ReplyStream, final_reply
from tokenmill.server.constraints import ToolSetup

TOOLS = ToolSetup(None, True, frozenset({"f"}), None)
NO_TOOLS = ToolSetup(None, False, frozenset(), None)
_PIECES = st.sampled_from([
    "<think>", "</think>", "<", "</", "think>", " ", "\n", "plan", "é",
    "<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": 1}}', '{"a"', ": 2}",
    "text"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join),
       st.lists(st.integers(1, 40), max_size=10),
       st.sampled_from(["outside", "inside", "off"]), st.booleans())
def test_streamed_reply_adds_up_to_the_whole_reply(text, cuts, mode, tools):
    setup = ReplySetup(TOOLS if tools else NO_TOOLS, mode)
    whole = final_reply(text, setup)
    stream = ReplyStream(setup)
    reasoning, content, calls = "", "", {}
    ends = sorted({c for c in cuts if c < len(text)}) + [len(text)]
    for end in ends:
        r, c, deltas = stream.update(text[:end], end == len(text))
        reasoning, content = reasoning + r, content + c
        for d in deltas:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    assert reasoning == (whole.reasoning or "")
    assert content == (whole.content or "")
    assert [tuple(calls[i]) for i in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in whole.calls]
    if mode == "off":
        assert whole.reasoning is None


def test_a_call_inside_the_thoughts_is_not_a_call():
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    reply = final_reply(f"<think>maybe {call}?</think>No call.", ReplySetup(TOOLS, "outside"))
    assert reply.calls == [] and reply.content == "No call."
    assert reply.reasoning == f"maybe {call}?"
    after = final_reply(f"<think>ok</think>{call}", ReplySetup(TOOLS, "outside"))
    assert [c.function.name for c in after.calls] == ["f"] and after.content is None
