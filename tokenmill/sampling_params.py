"""SamplingParams: how one request samples, with vLLM's field names and defaults.

Every field a user can set is validated in ``__post_init__``; a bad value raises
``ValueError`` naming the field and the accepted range, so the server can turn it into
a 400 and the offline API can show it as is.

StructuredOutputsParams: the constraint a request's output must satisfy (vLLM's shape).

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

import copy
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

_SAMPLING_EPS = 1e-5

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



class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1


@dataclass
class SamplingParams:
    """Sampling parameters for text generation (vLLM-compatible subset).

    temperature 0 means greedy. ``top_k`` of 0 or -1 disables top-k. ``seed`` makes one
    request's random draws independent of everything else in the batch.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    # json / regex / choice / grammar constraint on the output (tokenmill.structured)
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine, not the user.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown field
                raise ValueError(f"structured_outputs: {e}") from e
        elif (self.structured_outputs is not None
              and not isinstance(self.structured_outputs, StructuredOutputsParams)):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict "
                             f"of its fields, got {type(self.structured_outputs).__name__}.")
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                ) from e
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other knobs cannot change the outcome; keep them neutral.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}.")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2]")
        if self.temperature < 0.0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})."
            )
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be an integer in [0, 20]")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "must contain only non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must contain only non-negative integer token ids")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0:
                raise ValueError(f"logit_bias has a negative token id {tok}.")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} "
                                 f"for token {tok}.")

    def verify_vocab(self, vocab_size: int) -> None:
        """Checks token ids against the model's vocabulary (called by the engine)."""
        for tok in list(self.logit_bias or {}) + list(self.stop_token_ids or []):
            if tok >= vocab_size:
                raise ValueError(
                    f"token id {tok} in logit_bias/stop_token_ids is out of the "
                    f"vocabulary (size {vocab_size})."
                )

    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.GREEDY if self.temperature < _SAMPLING_EPS else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
