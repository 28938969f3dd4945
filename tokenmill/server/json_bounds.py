"""JSON as the server accepts it: parsing a request body, and bounds on JSON-valued fields.

``parse_json_body`` turns the body's bytes into a dict or raises a 400 naming what is
wrong: not JSON, not an object, ``NaN``/``Infinity`` (Python's json module accepts them; JSON
does not) or a number that overflows to infinity, a string with a lone surrogate
(``"\\ud800"`` is legal JSON but not Unicode, and breaks the tokenizer and the UTF-8 codec),
or more than ``MAX_JSON_DEPTH`` levels of nesting. The checks walk the value without
recursion, so no depth can make them fail.

They cost nothing on an ordinary body, large or not: the parse notes whether it met a
``NaN``/``Infinity`` literal, and scans of the raw bytes (in C) tell whether a lone
surrogate (an escape ``\\ud800``-``\\udfff``), a number that overflows (a three-digit exponent
or a 200-digit run) or deep nesting (more brackets than ``MAX_JSON_DEPTH``) is possible at
all. Only a body where one is possible is walked, and the walk does per-item Python work
only for what it must look at: building the path to a value waits until that value is
found wrong. (Parsing holds the GIL, which the engine thread needs too: a 1 MB body of
100,000 short strings took ~1 s of walking before, in per-item paths.)

``JsonObject`` and friends are pydantic types for fields that hold free-form JSON (schemas,
tool definitions, ``chat_template_kwargs``): a bound on their serialized size and depth.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from tokenmill.server.errors import invalid_request
from tokenmill.server.limits import MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_TEMPLATE_KWARGS_DEPTH


class _NonFinite:
    """What ``NaN`` / ``Infinity`` / ``-Infinity`` parse to, so the walk can name the field."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _valid_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar_problem(v: Any) -> str | None:
    if isinstance(v, str):
        if not _valid_unicode(v):
            return ("contains invalid Unicode (a lone surrogate such as \\ud800, which is not "
                    "a character)")
    elif isinstance(v, float):
        if not math.isfinite(v):
            return "is a number too large to represent"
    elif isinstance(v, _NonFinite):
        return (f"is {v.literal}, which is not a JSON number (JSON has no NaN or "
                "Infinity)")
    return None


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH, path: str = ""
                 ) -> tuple[str, str] | None:
    """(where, what is wrong) for a bad spot in a parsed JSON value, or None. Containers
    are visited depth first; the scalars of one container are checked in a tight loop,
    and a path is built only for containers and for the value found wrong."""
    what = _scalar_problem(value)
    if what is not None:
        return path, what
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, dict):
            if depth >= max_depth:
                return where, f"is nested more than {max_depth} levels deep"
            items: Any = v.items()
            inner = []
            for key, x in items:
                if not _valid_unicode(key):
                    return where, ("has a key with invalid Unicode (a lone surrogate such "
                                   "as \\ud800)")
                if isinstance(x, dict | list):
                    inner.append((x, key))
                elif (what := _scalar_problem(x)) is not None:
                    return _join(where, key), what
        elif isinstance(v, list):
            if depth >= max_depth:
                return where, f"is nested more than {max_depth} levels deep"
            inner = []
            for i, x in enumerate(v):
                if isinstance(x, dict | list):
                    inner.append((x, i))
                elif (what := _scalar_problem(x)) is not None:
                    return _join(where, i), what
        else:
            continue
        stack.extend((x, _join(where, k), depth + 1) for x, k in reversed(inner))
    return None


# What a body must contain for json_problem to find anything (see the module doc), looked
# for with bytes methods (C, ~1 ns a byte; a regex over digits took ~50-100 ns a byte).
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
# digits -> "0", e/E -> "e", "+" -> "+", anything else -> ".": a float overflows to infinity
# only with an exponent of three digits or more, or with 200+ digits before it
_NUMBER_SHAPE = bytes(b"0"[0] if chr(b).isdigit() and b < 128 else b"e"[0] if b in b"eE"
                      else b"+"[0] if b == b"+"[0] else b"."[0] for b in range(256))
_HUGE_NUMBER_SHAPES = (b"e000", b"e+000", b"0" * 200)


def _maybe_problem(raw: bytes, saw_non_finite: bool) -> bool:
    """False when the raw body cannot hold anything json_problem refuses."""
    if (saw_non_finite or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
            or _SURROGATE_ESCAPE.search(raw) is not None):
        return True
    shape = raw.translate(_NUMBER_SHAPE)
    return any(s in shape for s in _HUGE_NUMBER_SHAPES)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or an APIError (400) saying what is wrong with it."""
    non_finite: list[_NonFinite] = []

    def constant(literal: str) -> _NonFinite:
        non_finite.append(_NonFinite(literal))
        return non_finite[-1]

    try:
        value = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise invalid_request(f"The JSON body of your request is nested too deeply (at most "
                              f"{MAX_JSON_DEPTH} levels).") from None
    except UnicodeDecodeError:
        raise invalid_request("The body of your request is not valid UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise invalid_request(f"We could not parse the JSON body of your request: {e.msg} "
                              f"(line {e.lineno}, column {e.colno}).") from None
    except ValueError:  # e.g. an integer with more digits than Python converts
        raise invalid_request("We could not parse the JSON body of your request: a number "
                              "in it is too long.") from None
    if not isinstance(value, dict):
        raise invalid_request("The request body must be a JSON object ({...}), got "
                              f"{_json_kind(value)}.")
    problem = json_problem(value) if _maybe_problem(raw, bool(non_finite)) else None
    if problem is not None:
        where, what = problem
        if len(where) > 120:  # deep nesting: name where it starts
            where = where[:120] + "..."
        raise invalid_request(f"Invalid value for '{where}': it {what}."
                              if where else f"The request body {what}.", where or None)
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def bounded_json(max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """An AfterValidator: the value, serialized as JSON, fits in ``max_bytes`` and nests at
    most ``max_depth`` levels."""
    def check(value: Any) -> Any:
        problem = json_problem(value, max_depth)
        if problem is not None:
            where, what = problem
            raise ValueError(f"{where or 'the value'} {what}")
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "replace"))
        if size > max_bytes:
            raise ValueError(f"is {size} bytes of JSON; at most {max_bytes} are accepted")
        return value
    return AfterValidator(check)


def bounded_text(max_bytes: int = MAX_JSON_BYTES):
    """An AfterValidator for a string field that holds a program (a grammar, a regex, a
    schema as JSON text): at most ``max_bytes`` bytes of UTF-8."""
    def check(value: str) -> str:
        size = len(value.encode("utf-8", "replace"))
        if size > max_bytes:
            raise ValueError(f"is {size} bytes long; at most {max_bytes} are accepted")
        return value
    return AfterValidator(check)


_SIZE_NOTE = f"at most {MAX_JSON_BYTES} bytes as JSON"
JsonObject = Annotated[dict[str, Any], bounded_json(),
                       Field(description=f"a JSON object, {_SIZE_NOTE}")]
JsonText = Annotated[str, bounded_text(),
                     Field(description=f"at most {MAX_JSON_BYTES} bytes")]
TemplateKwargs = Annotated[dict[str, Any], bounded_json(max_depth=MAX_TEMPLATE_KWARGS_DEPTH),
                           Field(description=f"extra chat template variables, {_SIZE_NOTE}, "
                                             f"nested at most {MAX_TEMPLATE_KWARGS_DEPTH} "
                                             "levels")]
