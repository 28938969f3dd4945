"""Limits on what a constraint may cost, checked before it is parsed or compiled.

A grammar library expands a bounded repetition ``x{m,n}`` into up to n copies of ``x``;
nested ones multiply: ``((ab|[^a]){0,30}){0,30}`` is 900 copies of an ambiguous item, and
filling one token mask for it took 1-5 s of the engine thread, every step (measured with
xgrammar 0.2.9 on SmolLM2's 49k vocabulary); ``(a{0,1000}){0,1000}`` about 10 s. So:

* no single repetition bound above ``MAX_REPEAT``;
* no chain of nested repetitions (a repeated group inside a repeated group, or a repetition
  of a repetition) whose bounds multiply above ``MAX_NESTED_REPEAT``.

Checked in regexes, in the ``pattern``s of a JSON schema or structural tag, and in EBNF
grammars (through rule references too). Sizes (text length, enum and choice counts, depth)
are checked earlier, by ``StructuredOutputsParams``. What these rules cannot see (an
ambiguous single repetition like ``(.|..){0,300}`` also takes seconds per mask) is caught
at run time by the per-step mask budget (``manager.MASK_STEP_BUDGET_S``).
"""

from __future__ import annotations

import re
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams

MAX_REPEAT = 1000        # the largest bound of one repetition
MAX_NESTED_REPEAT = 100  # the largest product of the bounds of nested repetitions

_BOUNDS = re.compile(r"\{\s*(\d*)\s*(,\s*(\d*)\s*)?\}")
_RULE_HEAD = re.compile(r"(?m)^[ \t]*([A-Za-z_][\w.\-]*)[ \t]*::=")
_IDENT = re.compile(r"[A-Za-z_][\w.\-]*")


def check_constraint(params: StructuredOutputsParams) -> None:
    """Raises ValueError, naming the field, for a constraint over the limits."""
    kind = params.kind
    if kind == "regex":
        check_regex(params.regex, "regex")
    elif kind == "grammar":
        check_ebnf(params.grammar, "grammar")
    elif kind in ("json", "structural_tag"):
        for pattern in _patterns(getattr(params, kind)):
            check_regex(pattern, kind)


def check_regex(pattern: str, field: str) -> None:
    _Scanner(pattern, field, ebnf=False).scan(0, len(pattern))


def check_ebnf(grammar: str, field: str) -> None:
    """Repetitions in an EBNF grammar, nested through rule references as well (a rule
    being expanded again inside itself counts once: recursion is not repetition)."""
    heads = list(_RULE_HEAD.finditer(grammar))
    bodies = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(grammar)
        bodies[m.group(1)] = (m.end(), end)
    scanner = _Scanner(grammar, field, ebnf=True)
    products: dict[str, int] = {}
    expanding: set[str] = set()

    def rule_product(name: str) -> int:
        if name not in bodies or name in expanding:
            return 1
        if name not in products:
            expanding.add(name)
            products[name] = scanner.scan(*bodies[name])
            expanding.discard(name)
        return products[name]

    scanner.rule_product = rule_product
    try:
        for name in bodies:
            rule_product(name)
    except RecursionError as e:
        raise ValueError(f"{field}: rules reference each other too deeply.") from e


def _patterns(value: Any) -> list[str]:
    """The regexes inside a JSON schema or structural tag: ``pattern`` (and ``regex``)
    values, and the keys of ``patternProperties``."""
    found, stack = [], [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("pattern", "regex"):
                if isinstance(node.get(key), str):
                    found.append(node[key])
            props = node.get("patternProperties")
            if isinstance(props, dict):
                found.extend(k for k in props if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class _Scanner:
    """Walks regex / EBNF text keeping, per group, the largest product of nested
    repetition bounds inside it (1 if none); refuses bounds over the limits."""

    def __init__(self, text: str, field: str, ebnf: bool) -> None:
        self.text = text
        self.field = field
        self.ebnf = ebnf
        self.rule_product = lambda name: 1

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"{self.field}: {why}; such a constraint would stall generation "
                          "for every request.")

    def _bound(self, digits: str) -> int:
        if len(digits) > 9:
            raise self._refuse(f"a repetition bound of {digits[:12]}... is above the limit "
                               f"of {MAX_REPEAT}")
        return int(digits)

    def scan(self, start: int, end: int) -> int:
        """The largest product of nested repetition bounds in ``text[start:end]``."""
        text = self.text
        stack: list[list[int]] = []  # per open group: [max product inside, last atom]
        top = [1, 0]                 # last atom 0: none (a quantifier has nothing to repeat)
        i = start
        while i < end:
            c = text[i]
            atom = 1
            if c == "\\":
                i += 2
                if i - 1 < end and text[i - 1] in "pPuxk" and i < end and text[i] == "{":
                    close = text.find("}", i, end)
                    i = end if close == -1 else close + 1
            elif c == "[":
                i = self._class_end(i + 1, end)
            elif self.ebnf and c in "\"'":
                i = self._string_end(i + 1, end, c)
            elif self.ebnf and c == "#":
                newline = text.find("\n", i, end)
                i = end if newline == -1 else newline + 1
                continue
            elif self.ebnf and (m := _IDENT.match(text, i, end)):
                atom = self.rule_product(m.group(0))
                i = m.end()
            elif c == "(":
                stack.append(top)
                top = [1, 0]
                i += 1
                if not self.ebnf and i < end and text[i] == "?":  # (?:  (?=  (?<name>
                    while i < end and text[i] not in ":=!>)":
                        i += 1
                    i += 1
                continue
            elif c == ")":
                inner = top[0]
                top = stack.pop() if stack else [1, 0]
                top[0] = max(top[0], inner)
                top[1] = inner
                i += 1
                continue
            elif c == "|":
                top[1] = 0
                i += 1
                continue
            elif c in "*+?":
                i += 1
                continue  # unbounded or optional: a loop, not copies
            elif c == "{" and (m := _BOUNDS.match(text, i, end)) and (m.group(1) or m.group(3)):
                i = m.end()
                low = self._bound(m.group(1) or "0")
                high = low if m.group(2) is None else (
                    self._bound(m.group(3)) if m.group(3) else low)
                self._repeat(top, max(low, high, 1))
                continue
            else:
                i += 1
            top[1] = atom
            top[0] = max(top[0], atom)
        while stack:  # unbalanced: the parser reports it; count what was seen
            inner = top[0]
            top = stack.pop()
            top[0] = max(top[0], inner)
        return top[0]

    def _repeat(self, top: list[int], bound: int) -> None:
        if bound > MAX_REPEAT:
            raise self._refuse(f"a repetition bound of {bound} is above the limit of "
                               f"{MAX_REPEAT}")
        inner = top[1]
        if inner == 0:
            return
        product = inner * bound
        if inner > 1 and product > MAX_NESTED_REPEAT:
            raise self._refuse(f"nested repetitions multiply to {product} copies (limit "
                               f"{MAX_NESTED_REPEAT})")
        top[1] = product
        top[0] = max(top[0], product)

    def _class_end(self, i: int, end: int) -> int:
        text = self.text
        if i < end and text[i] == "^":
            i += 1
        if i < end and text[i] == "]":
            i += 1
        while i < end and text[i] != "]":
            i += 2 if text[i] == "\\" else 1
        return i + 1

    def _string_end(self, i: int, end: int, quote: str) -> int:
        text = self.text
        while i < end and text[i] != quote:
            i += 2 if text[i] == "\\" else 1
        return i + 1
