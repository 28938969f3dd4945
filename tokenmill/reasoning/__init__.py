"""Reasoning output: ``<think>...</think>`` split off a reply (``parser``), and grammars that
constrain only the answer after it (``grammar``). Pure text and constraint shapes; the
server decides when it applies (``--reasoning-parser``)."""

from tokenmill.reasoning.grammar import after_reasoning
from tokenmill.reasoning.parser import (
    PARSERS,
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningMode,
    ReasoningSplit,
    ReasoningStream,
    prompt_opens_think,
    reasoning_mode,
    split_reasoning,
)

__all__ = ["PARSERS", "THINK_CLOSE", "THINK_OPEN", "ReasoningMode", "ReasoningSplit",
           "ReasoningStream", "after_reasoning", "prompt_opens_think", "reasoning_mode",
           "split_reasoning"]
