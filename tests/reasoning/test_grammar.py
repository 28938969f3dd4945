"""The answer's constraint starts after </think>: what xgrammar accepts for wrapped
constraints (no model needed)."""

from __future__ import annotations

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as accepts

from tokenmill.reasoning import after_reasoning
from tokenmill.structured import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def grammar(params: StructuredOutputsParams, mode) -> xgr.Grammar:
    wrapped = after_reasoning(params, mode)
    assert wrapped is not None and wrapped.kind == "structural_tag"
    return xgr.Grammar.from_structural_tag(wrapped.structural_tag)


@pytest.mark.parametrize("text, inside, outside", [
    ('<think>free {text</think>\n\n{"a": 1}', True, True),
    ('free {text</think>{"a": 1}', True, False),
    ('{"a": 1}', False, True),                        # answering at once: outside only
    ("<think>x</think>not json", False, False),       # the answer is held to the schema
    ('<think>x</think>{"a": "str"}', False, False),
])
def test_json_schema_applies_after_the_think_block(text, inside, outside):
    params = StructuredOutputsParams(json=SCHEMA)
    assert accepts(grammar(params, "inside"), text) is inside
    assert accepts(grammar(params, "outside"), text) is outside


@pytest.mark.parametrize("params, answer, bad", [
    (StructuredOutputsParams(regex=r"\d{3}"), "123", "12a"),
    (StructuredOutputsParams(choice=["yes", "no"]), "no", "maybe"),
    (StructuredOutputsParams(grammar='root ::= "A" | "B"'), "B", "C"),
    (StructuredOutputsParams(json_object=True), '{"k": [1]}', "[1]"),
])
def test_every_constraint_kind_wraps(params, answer, bad):
    g = grammar(params, "outside")
    assert accepts(g, f"<think>thoughts: {bad}</think>{answer}")
    assert not accepts(g, f"<think>thoughts</think>{bad}")


def test_reasoning_off_or_no_constraint_is_unchanged():
    params = StructuredOutputsParams(regex="a")
    assert after_reasoning(params, "off") is params
    assert after_reasoning(None, "inside") is None
