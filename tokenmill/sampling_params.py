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
import math
import numbers
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

_SAMPLING_EPS = 1e-5

DEFAULT_MAX_WHITESPACE = 20

# ---- limits: every value must fit the tensors and loops it ends up in ------------------
# (the server exposes these; a value outside them is a ValueError naming the field)
MAX_N = 128                      # sequences per request
MAX_TOP_K = 2**31 - 1            # top_k above the vocabulary is clamped to it when sampling
MAX_LOGPROBS = 20                # logprobs and prompt_logprobs
MAX_TOKENS_LIMIT = 2**31 - 1     # max_tokens, min_tokens (the context caps them anyway)
MAX_TOKEN_ID = 2**31 - 1         # token ids in stop_token_ids / logit_bias (then the vocab)
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64; seed + i for the n sequences stays < 2**64
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024       # characters, each
MAX_STOP_TOTAL_LEN = 16 * 1024   # characters, all stop strings together
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024            # entries
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# structured outputs
MAX_CONSTRAINT_LEN = 64 * 1024   # characters of a schema / tag (as JSON), regex, grammar, choices
MAX_CHOICES = 1024               # entries of a choice list
MAX_ENUM = 1024                  # entries of one JSON-schema enum
MAX_SCHEMA_DEPTH = 64            # nesting of a JSON schema / structural tag
MAX_WHITESPACE_LIMIT = 1000      # max_whitespace (a bounded repetition in the grammar)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _json_depth_and_enums(value: Any, name: str) -> None:
    """Refuses a schema nested deeper than MAX_SCHEMA_DEPTH or with an enum longer than
    MAX_ENUM (iteratively: a deep document must not exhaust the Python stack)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"{name} is nested more than {MAX_SCHEMA_DEPTH} levels deep.")
        if isinstance(node, dict):
            enum = node.get("enum")
            if isinstance(enum, list) and len(enum) > MAX_ENUM:
                raise ValueError(f"{name} has an enum of {len(enum)} values; at most "
                                 f"{MAX_ENUM} are allowed.")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)

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
                if len(value) > MAX_CONSTRAINT_LEN:
                    raise ValueError(f"{name} is {len(value)} characters long; at most "
                                     f"{MAX_CONSTRAINT_LEN} are allowed.")
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} is not valid JSON: {e}") from e
                except RecursionError as e:
                    raise ValueError(f"{name} is nested too deeply.") from e
            if isinstance(getattr(self, name), dict | list):
                _json_depth_and_enums(getattr(self, name), name)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("json must be a JSON schema, i.e. a JSON object.")
        if self.structural_tag is not None and not isinstance(self.structural_tag, dict):
            raise ValueError("structural_tag must be a JSON object.")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("choice must be a non-empty list of non-empty strings.")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"choice has {len(self.choice)} entries; at most "
                                 f"{MAX_CHOICES} are allowed.")
            total = sum(len(c) for c in self.choice)
            if total > MAX_CONSTRAINT_LEN:
                raise ValueError(f"choice holds {total} characters; at most "
                                 f"{MAX_CONSTRAINT_LEN} are allowed.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string.")
            if value is not None and len(value) > MAX_CONSTRAINT_LEN:
                raise ValueError(f"{name} is {len(value)} characters long; at most "
                                 f"{MAX_CONSTRAINT_LEN} are allowed.")
        if self.max_whitespace is not None and (
                not _is_int(self.max_whitespace)
                or not 1 <= self.max_whitespace <= MAX_WHITESPACE_LIMIT):
            raise ValueError(f"max_whitespace must be an integer in [1, {MAX_WHITESPACE_LIMIT}] "
                             f"or None, got {self.max_whitespace!r}.")
        self._key = self._make_key(given[0])
        if given[0] in ("json", "structural_tag") and len(self._key[1]) > MAX_CONSTRAINT_LEN:
            raise ValueError(f"{given[0]} is {len(self._key[1])} characters long as JSON; "
                             f"at most {MAX_CONSTRAINT_LEN} are allowed.")

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
        self._normalize_lists()
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown field
                raise ValueError(f"structured_outputs: {e}") from e
        elif (self.structured_outputs is not None
              and not isinstance(self.structured_outputs, StructuredOutputsParams)):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict "
                             f"of its fields, got {type(self.structured_outputs).__name__}.")
        self._verify()
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other knobs cannot change the outcome; keep them neutral.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _normalize_lists(self) -> None:
        """stop, stop_token_ids and logit_bias as a list, a list and a dict of ints to
        floats, their sizes checked before anything is built from them."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, list | tuple):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got "
                             f"{type(self.stop).__name__}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} "
                             "are allowed.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, list | tuple | set | frozenset):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError("stop_token_ids must be a list of token ids, got "
                             f"{type(self.stop_token_ids).__name__}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} entries; at most "
                             f"{MAX_STOP_TOKEN_IDS} are allowed.")
        if self.logit_bias:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must map token ids to numbers, got "
                                 f"{type(self.logit_bias).__name__}.")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                                 f"{MAX_LOGIT_BIAS} are allowed.")
            bias = {}
            for k, v in self.logit_bias.items():
                tok = _token_id(k)
                if tok is None or not _is_real(v) and not isinstance(v, str):
                    raise ValueError(f"logit_bias must map token ids to numbers, got "
                                     f"{k!r}: {v!r}.")
                try:
                    bias[tok] = float(v)
                except (TypeError, ValueError, OverflowError) as e:
                    raise ValueError(f"logit_bias must map token ids to numbers, got "
                                     f"{k!r}: {v!r}.") from e
            self.logit_bias = bias

    def _verify(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}.")

        def integer(name: str, lo: int, hi: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not _is_int(value) or not lo <= value <= hi:
                raise bad(name, f"must be an integer in [{lo}, {hi}]")
            setattr(self, name, int(value))

        def real(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            if (not _is_real(value) or not math.isfinite(value) or not lo <= value <= hi
                    or (lo_open and value == lo)):
                raise bad(name, f"must be a finite number in {'(' if lo_open else '['}"
                                f"{lo:g}, {hi:g}]")
            setattr(self, name, float(value))

        integer("n", 1, MAX_N)
        real("presence_penalty", -2.0, 2.0)
        real("frequency_penalty", -2.0, 2.0)
        real("repetition_penalty", 0.0, 2.0, lo_open=True)
        if (not _is_real(self.temperature) or not math.isfinite(self.temperature)
                or self.temperature < 0):
            raise bad("temperature", "must be a finite number >= 0")
        self.temperature = float(self.temperature)
        real("top_p", 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or not (self.top_k == -1 or 0 <= self.top_k <= MAX_TOP_K):
            raise bad("top_k", f"must be -1 or 0 (disabled) or an integer in [1, {MAX_TOP_K}]")
        self.top_k = int(self.top_k)
        real("min_p", 0.0, 1.0)
        integer("seed", *SEED_RANGE, optional=True)
        integer("max_tokens", 1, MAX_TOKENS_LIMIT, optional=True)
        integer("min_tokens", 0, MAX_TOKENS_LIMIT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})."
            )
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "must contain only non-empty strings")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_LEN:
            raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_LEN} characters "
                             f"long, got one of {longest}.")
        total = sum(len(s) for s in self.stop)
        if total > MAX_STOP_TOTAL_LEN:
            raise ValueError(f"stop strings may hold at most {MAX_STOP_TOTAL_LEN} characters "
                             f"together, got {total}.")
        if any(not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must contain only token ids (integers in "
                                        f"[0, {MAX_TOKEN_ID}])")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        lo, hi = LOGIT_BIAS_RANGE
        for tok, bias in (self.logit_bias or {}).items():
            if not 0 <= tok <= MAX_TOKEN_ID:
                raise ValueError(f"logit_bias has a token id {tok} outside [0, {MAX_TOKEN_ID}].")
            if not math.isfinite(bias) or not lo <= bias <= hi:
                raise ValueError(f"logit_bias values must be in [{lo:g}, {hi:g}], got {bias} "
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
        """A shallow copy: the big fields (stop strings, logit_bias, the constraint) are
        shared, never mutated after validation. The engine makes one per sequence of an
        ``n > 1`` request and sets only its scalars (``n``, ``seed``)."""
        return copy.copy(self)


def _token_id(key: Any) -> int | None:
    """A logit_bias key as a token id (an integer, or its decimal text as JSON keys are),
    or None."""
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and len(key) <= 20:
        try:
            return int(key)
        except ValueError:
            return None
    if isinstance(key, float) and key.is_integer():
        return int(key)
    return None
