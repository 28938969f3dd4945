"""StructuredOutputsParams: the constraint a request's output must satisfy (vLLM's shape).

Exactly one constraint per request:

* ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON value valid
  against it;
* ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``);
* ``regex``: the whole output matches the regular expression;
* ``choice``: the output is exactly one of the listed strings;
* ``grammar``: an EBNF grammar (GBNF dialect, with a ``root`` rule);
* ``structural_tag``: free text with tagged regions held to a format (xgrammar's structural
  tag, as JSON); the server builds these for tool calls.

Whitespace inside JSON: by default any whitespace is allowed between tokens, but never more
than ``max_whitespace`` characters in a row, so a small model cannot loop on spaces or
newlines forever. ``disable_any_whitespace`` allows none beyond the single spaces of
``{"a": 1, "b": 2}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_WHITESPACE = 20

_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    max_whitespace: int | None = DEFAULT_MAX_WHITESPACE
    # Filled in __post_init__: the JSON texts, so that equal constraints share a grammar.
    _key: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one of json, json_object, "
                             f"regex, choice, grammar, structural_tag; got {given or 'none'}.")
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} is not valid JSON: {e}") from e
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("json must be a JSON schema, i.e. a JSON object.")
        if self.structural_tag is not None and not isinstance(self.structural_tag, dict):
            raise ValueError("structural_tag must be a JSON object.")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("choice must be a non-empty list of non-empty strings.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string.")
        if self.max_whitespace is not None and (not isinstance(self.max_whitespace, int)
                                                or self.max_whitespace < 1):
            raise ValueError(f"max_whitespace must be an integer >= 1 or None, got "
                             f"{self.max_whitespace!r}.")
        self._key = self._make_key(given[0])

    @property
    def kind(self) -> str:
        return self._key[0]

    @property
    def cache_key(self) -> tuple:
        """Equal for constraints that compile to the same grammar."""
        return self._key

    def _make_key(self, kind: str) -> tuple:
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        elif kind == "choice":
            value = tuple(value)
        whitespace = ("compact" if self.disable_any_whitespace else self.max_whitespace)
        return (kind, value, whitespace)
