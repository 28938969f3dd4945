"""``<think>...</think>`` reasoning split off a reply, the same whether whole or streamed.

Two parsers (``--reasoning-parser``), differing only in where the output starts:

* ``qwen3``: the reply starts outside a think block, unless the rendered prompt ends with
  ``<think>`` (a template that opens the block for the model, as Qwen3's thinking
  templates do); then it starts inside;
* ``deepseek_r1``: the reply always starts inside a think block (DeepSeek-R1's templates
  open it in the prompt).

The contract of ``split_reasoning(text, final, starts_inside)``:

* reasoning is only ever at the start of the reply. Starting inside, the text up to the
  first ``</think>`` is reasoning (a ``<think>`` the model repeats first is dropped).
  Starting outside, the reply is reasoning only if it begins (after whitespace) with
  ``<think>``; otherwise all of it is content, unchanged;
* a think block that never closes (``max_tokens`` reached) is all reasoning, no content;
* the reasoning is the text between the tags with surrounding whitespace trimmed; the
  content after ``</think>`` has its leading whitespace trimmed;
* with ``final=False`` only what cannot change any more is returned: a suffix that may be
  the start of a tag, and whitespace that may turn out to be trailing, are held back. So
  the result for a prefix of a text is, field by field, a prefix of the result for the
  text, and the final result extends both: a stream sends differences
  (``ReasoningStream``) and they add up exactly to the non-streamed split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PARSERS = ("qwen3", "deepseek_r1")
_WS = " \t\r\n"

ReasoningMode = Literal["off", "outside", "inside"]


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str         # settled reasoning text ("" when none)
    content: str           # settled content text
    has_reasoning: bool    # a think block was found (or the reply started inside one)
    closed: bool           # the think block ended (content may follow)


def _without_partial(text: str, tag: str) -> str:
    """``text`` less its longest suffix that could be the beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return text[:-n]
    return text


def _inside(text: str, final: bool) -> ReasoningSplit:
    """``text`` starts inside a think block."""
    close = text.find(THINK_CLOSE)
    if close >= 0:
        return ReasoningSplit(text[:close].strip(_WS),
                              text[close + len(THINK_CLOSE):].lstrip(_WS), True, True)
    if final:
        return ReasoningSplit(text.strip(_WS), "", True, False)
    # not final: hold back a partial </think> and whitespace that may be trailing
    return ReasoningSplit(_without_partial(text, THINK_CLOSE).strip(_WS), "", True, False)


def split_reasoning(text: str, final: bool, mode: ReasoningMode) -> ReasoningSplit:
    """Reasoning and content of ``text`` (the module docstring states the contract)."""
    if mode == "off":
        return ReasoningSplit("", text, False, False)
    if mode == "inside":
        body = text.lstrip(_WS)
        if body.startswith(THINK_OPEN):  # the model opened the block again
            return _inside(body[len(THINK_OPEN):], final)
        if not final and THINK_OPEN.startswith(body) and body:
            return ReasoningSplit("", "", True, False)  # maybe "<think>" still coming
        return _inside(text, final)
    body = text.lstrip(_WS)
    if body.startswith(THINK_OPEN):
        return _inside(body[len(THINK_OPEN):], final)
    if not final and THINK_OPEN.startswith(body):
        return ReasoningSplit("", "", False, False)  # undecided: nothing is settled
    return ReasoningSplit("", text, False, False)


def prompt_opens_think(prompt_tail: str) -> bool:
    """True when a rendered prompt ends inside a think block (its last non-whitespace text
    is ``<think>``): the template opened it and the reply starts inside."""
    return prompt_tail.rstrip(_WS).endswith(THINK_OPEN)


def thinking_disabled(template_kwargs: Mapping[str, Any] | None) -> bool:
    """``enable_thinking: false`` (Qwen3) or ``thinking: false`` (DeepSeek) in the chat
    template's variables: the template keeps the model from thinking; no parsing."""
    kwargs = template_kwargs or {}
    return kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False


def reasoning_mode(parser: str | None, prompt_tail: str,
                   template_kwargs: Mapping[str, Any] | None = None) -> ReasoningMode:
    """Where a reply starts, for ``parser`` (None: no parser) and the prompt's last text."""
    if parser is None or thinking_disabled(template_kwargs):
        return "off"
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; choose from {list(PARSERS)}")
    if parser == "deepseek_r1" or prompt_opens_think(prompt_tail):
        return "inside"
    return "outside"


class ReasoningStream:
    """One streamed reply: each ``update`` with the text so far returns the new reasoning
    text and the whole settled content so far (for the tool-call parser downstream)."""

    def __init__(self, mode: ReasoningMode) -> None:
        self.mode = mode
        self.reasoning_sent = 0

    def update(self, text: str, final: bool) -> tuple[str, str]:
        split = split_reasoning(text, final, self.mode)
        new = split.reasoning[self.reasoning_sent:]
        self.reasoning_sent = max(self.reasoning_sent, len(split.reasoning))
        return new, split.content
