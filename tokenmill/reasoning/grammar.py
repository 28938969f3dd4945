"""Constraints that apply to the answer after the reasoning, not to the thoughts.

``after_reasoning(params, mode)`` turns a constraint (JSON schema, ``json_object``, regex,
choice, EBNF grammar, or the structural tags that tool calls use) into one xgrammar
structural tag: a think block of free text, then a little whitespace, then the original
constraint. Where the reply starts inside the block (``mode == "inside"``) the grammar
starts in the free text and waits for ``</think>``; where it starts outside, the think
block is optional (a model may answer at once). A think block that never closes leaves
the answer unconstrained only because there is no answer: the grammar is still waiting.

A structural tag the client sends itself describes the whole reply, reasoning included
(as xgrammar's own reasoning tags do), so it is passed on unchanged: call this only for
constraints the server builds (tool calls) or that describe an answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tokenmill.reasoning.parser import THINK_CLOSE, THINK_OPEN, ReasoningMode
from tokenmill.structured import StructuredOutputsParams

# What may come between </think> and the answer (Qwen writes "\n\n"); bounded.
GAP = {"type": "regex", "pattern": "[ \\t\\r\\n]{0,8}"}


def _answer_format(params: StructuredOutputsParams) -> dict[str, Any]:
    """The constraint as a structural-tag format."""
    kind = params.kind
    if kind in ("json", "json_object"):
        # structural tags cannot forbid whitespace in JSON: "compact" allows one at a time
        return {"type": "json_schema",
                "json_schema": params.json if kind == "json" else {"type": "object"},
                "max_whitespace_cnt": 1 if params.disable_any_whitespace
                else params.max_whitespace}
    if kind == "regex":
        return {"type": "regex", "pattern": params.regex}
    if kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": c}
                                           for c in params.choice or []]}
    if kind == "grammar":
        return {"type": "grammar", "grammar": params.grammar}
    tag = params.structural_tag or {}
    return tag.get("format", tag)


def think_block(mode: ReasoningMode) -> dict[str, Any]:
    """The reasoning part of a reply as a structural-tag format."""
    block = {"type": "tag", "begin": "" if mode == "inside" else THINK_OPEN,
             "content": {"type": "any_text"}, "end": THINK_CLOSE}
    return block if mode == "inside" else {"type": "optional", "content": block}


def after_reasoning(params: StructuredOutputsParams | None,
                    mode: ReasoningMode) -> StructuredOutputsParams | None:
    """``params`` applied after the think block (unchanged when reasoning is off)."""
    if params is None or mode == "off":
        return params
    fmt = {"type": "sequence", "elements": [think_block(mode), GAP, _answer_format(params)]}
    return replace(params, json=None, regex=None, choice=None, grammar=None,
                   json_object=None, structural_tag={"type": "structural_tag", "format": fmt})
