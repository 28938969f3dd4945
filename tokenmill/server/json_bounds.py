"""JSON as the server accepts it: parsing a request body, and bounds on JSON-valued fields.

``parse_json_body`` turns the body's bytes into a dict or raises a 400 naming what is
wrong: not JSON, not an object, ``NaN``/``Infinity`` (Python's json module accepts them; JSON
does not) or a number that overflows to infinity, a string with a lone surrogate
(``"\\ud800"`` is legal JSON but not Unicode, and breaks the tokenizer and the UTF-8 codec),
or more than ``MAX_JSON_DEPTH`` levels of nesting. The checks walk the value without
recursion, so no depth can make them fail.

``JsonObject`` and friends are pydantic types for fields that hold free-form JSON (schemas,
tool definitions, ``chat_template_kwargs``): a bound on their serialized size and depth.
"""

from __future__ import annotations

import json
import math
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


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH, path: str = ""
                 ) -> tuple[str, str] | None:
    """(where, what is wrong) for the first bad spot in a parsed JSON value, or None."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, str):
            if not _valid_unicode(v):
                return where, ("contains invalid Unicode (a lone surrogate such as \\ud800, "
                               "which is not a character)")
        elif isinstance(v, float):
            if not math.isfinite(v):
                return where, "is a number too large to represent"
        elif isinstance(v, _NonFinite):
            return where, (f"is {v.literal}, which is not a JSON number (JSON has no NaN or "
                           "Infinity)")
        elif isinstance(v, dict):
            if depth >= max_depth:
                return where, f"is nested more than {max_depth} levels deep"
            items = list(v.items())
            for key, _ in items:
                if not _valid_unicode(key):
                    return where, ("has a key with invalid Unicode (a lone surrogate such as "
                                   "\\ud800)")
            stack.extend((x, _join(where, k), depth + 1) for k, x in reversed(items))
        elif isinstance(v, list):
            if depth >= max_depth:
                return where, f"is nested more than {max_depth} levels deep"
            stack.extend((x, _join(where, i), depth + 1) for i, x in reversed(list(enumerate(v))))
    return None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or an APIError (400) saying what is wrong with it."""
    try:
        value = json.loads(raw, parse_constant=_NonFinite)
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
    problem = json_problem(value)
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
