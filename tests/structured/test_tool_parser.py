"""Tool calls parsed out of model text: both formats, and streamed == whole for any split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.tool_calling.parser import ToolCallStream, parse_tool_output

NAMES = {"get_weather", "get_time", "f"}

CASES = {
    "plain text": ("Hello there", "Hello there", []),
    "tagged, two calls, text before": (
        ' Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        "Sure.", [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    "tagged, arguments first, braces in strings": (
        '<tool_call>{"arguments": {"a": [1, {"b": "}{"}]}, "name": "f"}</tool_call> after',
        "after", [("f", '{"a": [1, {"b": "}{"}]}')]),
    "plain json, parameters key": (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
        [("get_weather", '{"city": "Rome"}')]),
    "plain json list, string arguments": (
        '[{"name": "get_weather", "arguments": {"city": "A"}}, '
        '{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]', "",
        [("get_weather", '{"city": "A"}'), ("get_time", '{"tz": "UTC"}')]),
    "json that is not a call (unknown name)": (
        '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    "json whose first key is not name": (
        '{"age": 3, "name": "get_weather"}', '{"age": 3, "name": "get_weather"}', []),
    "truncated call keeps what was written": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        "", [("get_weather", '{"city": "Par')]),
    "malformed arguments stop at the close tag": (
        'a <tool_call>{"name": "f", "arguments": {"a": 1</tool_call>', "a",
        [("f", '{"a": 1')]),
    "call without arguments": ('<tool_call>\n{"name": "f"}\n</tool_call>', "", [("f", "{}")]),
    "block without a name is dropped": ("<tool_call>junk</tool_call>ok", "ok", []),
    "half a tag at the end is text": ("text <tool_ca", "text <tool_ca", []),
}


@pytest.mark.parametrize("text,content,calls", CASES.values(), ids=list(CASES))
def test_parse_whole_text(text, content, calls):
    parsed = parse_tool_output(text, final=True, tool_names=NAMES)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls


def test_plain_json_needs_tool_names():
    text = '{"name": "get_weather", "arguments": {}}'
    assert parse_tool_output(text, True, None).calls == []
    assert parse_tool_output(text, True, None).content == text


def test_nothing_is_emitted_before_it_is_certain():
    assert parse_tool_output("Hi <tool_", final=False).content == "Hi"
    assert parse_tool_output("Hi \n", final=False).content == "Hi"
    assert parse_tool_output('{"name": "get_wea', False, NAMES).content == ""
    partial = parse_tool_output('<tool_call>{"name": "f", "arguments": {"a": "x</tool', False)
    assert partial.calls[0].arguments == '{"a": "x'
    assert parse_tool_output('<tool_call>{"name": "f', final=False).calls == []


def replay(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feeds the prefixes ending at ``cuts`` to a stream; returns what the deltas add up to."""
    stream = ToolCallStream(NAMES)
    content, calls, ids = "", {}, []
    ends = sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]
    for end in ends:
        piece, deltas = stream.update(text[:end], final=end == len(text))
        content += piece
        for d in deltas:
            if d.id is not None:
                assert d.index == len(calls) and d.name
                calls[d.index] = [d.name, ""]
                ids.append(d.id)
            calls[d.index][1] += d.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)], ids


ARGS = st.recursive(st.none() | st.booleans() | st.integers(-99, 99)
                    | st.text("ab }{[]\"\\:,\n", max_size=6),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text("xyz\"{", max_size=3), inner, max_size=3),
                    max_leaves=6)


@st.composite
def model_text(draw) -> str:
    """Text as a model might write it: prose, tagged calls, plain-JSON calls."""
    if draw(st.booleans()):  # plain JSON
        calls = [{"name": draw(st.sampled_from(sorted(NAMES))),
                  draw(st.sampled_from(["arguments", "parameters"])): draw(ARGS)}
                 for _ in range(draw(st.integers(1, 2)))]
        body = json.dumps(calls if len(calls) > 1 or draw(st.booleans()) else calls[0],
                          indent=draw(st.sampled_from([None, 2])))
        return draw(st.sampled_from(["", " ", "\n"])) + body
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(st.text("ab <>/\n", max_size=8)))
        call = {"name": draw(st.sampled_from(sorted(NAMES))), "arguments": draw(ARGS)}
        parts.append(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    parts.append(draw(st.text("ab <tool_call>", max_size=12)))
    text = "".join(parts)
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streamed_deltas_add_up_to_the_whole_parse(data):
    text = data.draw(model_text())
    cuts = data.draw(st.lists(st.integers(0, max(len(text), 1)), max_size=12))
    whole = parse_tool_output(text, final=True, tool_names=NAMES)
    content, calls, ids = replay(text, cuts)
    assert content == whole.content
    assert calls == [(c.name, c.arguments) for c in whole.calls]
    assert len(set(ids)) == len(ids)
    # token by token too
    assert replay(text, list(range(len(text))))[:2] == (content, calls)


@settings(max_examples=100, deadline=None)
@given(args=st.dictionaries(st.text(max_size=5), ARGS, max_size=3))
def test_arguments_are_the_json_the_model_wrote(args):
    body = json.dumps({"name": "f", "arguments": args})
    parsed = parse_tool_output(f"<tool_call>\n{body}\n</tool_call>", final=True)
    assert json.loads(parsed.calls[0].arguments) == args
