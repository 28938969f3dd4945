"""The interface between the engine and a grammar library.

Constrained decoding works on token bitmasks. A constraint is *parsed* into a grammar
(cheap: this is where a bad schema or regex is found), the grammar is *compiled* against
the tokenizer's vocabulary (expensive: for every grammar state, which of the ~50k tokens
can follow, precomputed where possible), and every sequence gets its own *matcher*, a
cursor into the compiled grammar. Before each sampling step the matcher writes one bit
per vocabulary token (1 = allowed) into a row of an int32 bitmask; the bitmask sets the
logits of disallowed tokens to -inf; the sampled token is then fed back to the matcher.
A matcher that has reached the end of its grammar (and accepted a stop token) is
*terminated*: the sequence is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from tokenmill.sampling_params import StructuredOutputsParams


class GrammarMatcher(ABC):
    """One sequence's position in a compiled grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advances past ``token_id``; False (and no change) if the grammar forbids it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token has been accepted."""


class GrammarBackend(ABC):
    """Parses constraints, compiles them, and masks logits for one tokenizer."""

    @abstractmethod
    def parse(self, params: StructuredOutputsParams) -> Any:
        """Checks the constraint and returns the backend's grammar object. Raises
        ValueError with a message a user can act on for an invalid schema or grammar."""

    @abstractmethod
    def compile(self, grammar: Any) -> Any:
        """Compiles a parsed grammar against the vocabulary (thread-safe, may be slow)."""

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of ``compiled``."""

    @abstractmethod
    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """An int32 bitmask for ``rows`` rows of logits."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor,
                     rows: list[int]) -> None:
        """Writes matcher i's allowed tokens into ``bitmask[rows[i]]``."""

    @abstractmethod
    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        """Sets, in place, ``logits[r, t] = -inf`` for every token t masked out in
        ``bitmask[r]``, for r in ``rows`` (other rows are left alone)."""
