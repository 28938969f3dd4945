r"""Limits on what a constraint may cost, checked before it is parsed or compiled.

A grammar library expands a bounded repetition ``x{m,n}`` into up to n copies of ``x``;
nested ones multiply: ``((ab|[^a]){0,30}){0,30}`` is 900 copies of an ambiguous item, and
filling one token mask for it took 1-5 s of the engine thread, every step (measured with
xgrammar 0.2.9 on SmolLM2's 49k vocabulary); ``(a{0,1000}){0,1000}`` about 10 s. So:

* no single repetition bound above ``MAX_REPEAT``;
* no chain of nested repetitions (a repeated group inside a repeated group, or a repetition
  of a repetition) whose bounds multiply above ``MAX_NESTED_REPEAT``.

Checked in regexes, in the ``pattern``s of a JSON schema or structural tag, and in EBNF
grammars (through rule references too). Sizes (text length, enum and choice counts, depth)
are checked earlier, by ``StructuredOutputsParams``.

A third rule, checked in the same places: no group (in EBNF, a rule reference too) repeated
more than ``MAX_BROAD_GROUP_REPEAT`` times whose body can match a string of broad atoms only
(``.``, a negated class, a class or escape of more than ``BROAD_CLASS_CHARS`` characters or
with whitespace in it, whitespace itself, an EBNF string of whitespace). xgrammar expands
such a group into copies, and since nearly every token of a vocabulary is made of broad
characters (most BPE tokens start with a space), nearly every token can run across the end
of one copy into the next: each mask fill walks the whole vocabulary through every reachable
copy. Measured with xgrammar 0.2.9 on SmolLM2's 49k vocabulary, the costliest of the first
four mask fills, one process: ``(.|..){0,N}`` 12 ms at N=2, 112 ms at 4, 560 ms at 10, 2.3 s
at 300; ``(.?){0,30}`` 2.6 s; ``(\w+\s?){0,50}`` 1.6 s; ``([^a]|ab){0,30}`` 62 ms;
``(..){0,30}`` 50 ms; ``(\w+ ){0,50}`` 50 ms, against an ~18 ms decode step; the EBNF
``([^a] | "ab"){0,30}`` 270 ms, as a rule reference too. Groups whose every match holds a
narrow, non-space character stay cheap (< 1 ms: ``(a|bc){0,100}``, ``(x?){0,100}``,
``([a-z]+,){0,100}``, ``(\d\d){0,30}``), as do repetitions of one atom (``[a-z]{0,1000}``,
``(\w){0,30}``: xgrammar repeats a character class without copies of a rule). The rule
refuses a few cheap patterns too (``(\w+){0,30}``, ``([A-Za-z0-9]{4}){0,30}``: 12 ms);
``\w*`` and ``[\w ]{0,300}`` say the same things cheaply. JSON-schema ``maxLength`` strings
are not regexes and are not affected. What the rules cannot see is caught at run time by the
per-step mask budget (``manager.MASK_STEP_BUDGET_S``).
"""

from __future__ import annotations

import re
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams

MAX_REPEAT = 1000        # the largest bound of one repetition
MAX_NESTED_REPEAT = 100  # the largest product of the bounds of nested repetitions
MAX_BROAD_GROUP_REPEAT = 2  # copies of a group that can match broad characters only
BROAD_CLASS_CHARS = 16      # a character class with more characters than this is broad

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
    rules: dict[str, tuple[int, str]] = {}  # name -> (product, kind as an atom)
    expanding: set[str] = set()

    def rule(name: str) -> tuple[int, str]:
        if name not in bodies or name in expanding:
            return 1, ""
        if name not in rules:
            expanding.add(name)
            rules[name] = scanner.scan(*bodies[name]), scanner.kind
            expanding.discard(name)
        return rules[name]

    scanner.rule = rule
    try:
        for name in bodies:
            rule(name)
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


class _Group:
    """What the scanner keeps about one open group (and the alternative being read)."""

    __slots__ = ("most", "last", "last_group", "last_narrow", "broad", "skippable", "blocked",
                 "has_broad", "alternatives", "atoms", "quantified", "simple")

    def __init__(self) -> None:
        self.most = 1            # the largest product of nested repetition bounds inside
        self.last = 0            # the last atom's product (0: none, nothing to repeat)
        self.last_group: tuple[bool, bool] | None = None  # last atom a group: (broad, single)
        self.last_narrow = False  # the last atom is a narrow one, counted in ``blocked``
        self.broad = False       # some finished alternative matches broad characters only
        self.skippable = False   # some finished alternative needs no narrow character
        self.blocked = 0         # required narrow atoms in the current alternative
        self.has_broad = False   # a broad atom in the current alternative
        self.alternatives = 1
        self.atoms = 0
        self.quantified = False
        self.simple = True       # the last atom is no group, or a single-atom one

    def atom(self, product: int, kind: str, group: tuple[bool, bool] | None = None) -> None:
        """kind: "broad", "narrow" or "" (neither: an anchor, an EBNF string or rule)."""
        self.last = product
        self.most = max(self.most, product)
        self.last_group = group
        self.last_narrow = kind == "narrow"
        self.blocked += self.last_narrow
        self.has_broad |= kind == "broad"
        self.atoms += 1
        self.simple = group is None or group[1]

    def optional(self) -> None:
        """The last atom may match nothing (``?``, ``*``, ``{0,n}``)."""
        if self.last_narrow:
            self.blocked -= 1
            self.last_narrow = False

    def end_alternative(self) -> None:
        self.broad |= self.has_broad and not self.blocked
        self.skippable |= not self.blocked
        self.blocked, self.has_broad = 0, False

    def as_atom(self) -> tuple[bool, bool]:
        """(broad, single) of this group once closed: whether it can match broad characters
        only, and whether it is a single unquantified atom (``(.)`` is just ``.``)."""
        self.end_alternative()
        single = (self.alternatives == 1 and self.atoms == 1 and not self.quantified
                  and self.simple)
        return self.broad, single

    def kind(self) -> str:
        """This closed group as an atom of its parent."""
        return "broad" if self.broad else "" if self.skippable else "narrow"


_BROAD_ESCAPES = frozenset("wWsSDpPntrfv")


class _Scanner:
    """Walks regex / EBNF text keeping, per group, the largest product of nested
    repetition bounds inside it (1 if none), and in regexes whether a group can match
    broad characters only; refuses what is over the limits."""

    def __init__(self, text: str, field: str, ebnf: bool) -> None:
        self.text = text
        self.field = field
        self.ebnf = ebnf
        self.rule = lambda name: (1, "")  # an EBNF rule's (product, kind as an atom)
        self.kind = ""  # what the last scan read, as an atom (see _Group.kind)

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
        regex = not self.ebnf
        stack: list[_Group] = []
        top = _Group()
        i = start
        while i < end:
            c = text[i]
            product, kind, group = 1, "narrow" if regex else "", None
            if c == "\\":
                if i + 1 < end and text[i + 1] in _BROAD_ESCAPES:
                    kind = "broad" if regex else ""
                i += 2
                if i - 1 < end and text[i - 1] in "pPuxk" and i < end and text[i] == "{":
                    close = text.find("}", i, end)
                    i = end if close == -1 else close + 1
            elif c == "[":
                close = self._class_end(i + 1, end)
                if self._broad_class(i + 1, close - 1):
                    kind = "broad"
                i = close
            elif self.ebnf and c in "\"'":
                close = self._string_end(i + 1, end, c)
                literal = text[i + 1:close - 1]
                kind = ("narrow" if any(not ch.isspace() for ch in literal.replace("\\n", "")
                                        .replace("\\t", "").replace("\\r", ""))
                        else "broad" if literal else "")
                i = close
            elif self.ebnf and c == "#":
                newline = text.find("\n", i, end)
                i = end if newline == -1 else newline + 1
                continue
            elif self.ebnf and (m := _IDENT.match(text, i, end)):
                product, kind = self.rule(m.group(0))
                group = (kind == "broad", False)  # a rule is repeated in copies, as a group
                i = m.end()
            elif c == "(":
                stack.append(top)
                top = _Group()
                i += 1
                if regex and i < end and text[i] == "?":  # (?:  (?=  (?<name>
                    while i < end and text[i] not in ":=!>)":
                        i += 1
                    i += 1
                continue
            elif c == ")":
                inner, group = top, top.as_atom()
                top = stack.pop() if stack else _Group()
                top.atom(inner.most, inner.kind(), group)
                i += 1
                continue
            elif c == "|":
                top.end_alternative()
                top.alternatives += 1
                i += 1
                continue
            elif c in "*+?":
                if c != "+":
                    top.optional()
                top.quantified = True
                i += 1
                continue  # unbounded or optional: a loop, not copies
            elif c == "{" and (m := _BOUNDS.match(text, i, end)) and (m.group(1) or m.group(3)):
                i = m.end()
                low = self._bound(m.group(1) or "0")
                high = low if m.group(2) is None else (
                    self._bound(m.group(3)) if m.group(3) else low)
                if low == 0:
                    top.optional()
                top.quantified = True
                self._repeat(top, max(low, high, 1))
                continue
            else:
                i += 1
                if regex and (c == "." or c.isspace()):
                    kind = "broad"
                elif regex and c in "^$":
                    kind = ""
            top.atom(product, kind, group)
        while stack:  # unbalanced: the parser reports it; count what was seen
            inner = top
            top = stack.pop()
            top.most = max(top.most, inner.most)
        top.as_atom()
        self.kind = top.kind()
        return top.most

    def _repeat(self, top: _Group, bound: int) -> None:
        if bound > MAX_REPEAT:
            raise self._refuse(f"a repetition bound of {bound} is above the limit of "
                               f"{MAX_REPEAT}")
        if (bound > MAX_BROAD_GROUP_REPEAT and top.last_group is not None
                and top.last_group[0] and not top.last_group[1]):
            raise self._refuse(
                f"a group that can match broad characters only (any character, a large or "
                f"negated class, whitespace) is repeated {bound} times (limit "
                f"{MAX_BROAD_GROUP_REPEAT}); repeat a character class instead, or put a "
                "narrow character in every repetition")
        inner = top.last
        if inner == 0:
            return
        product = inner * bound
        if inner > 1 and product > MAX_NESTED_REPEAT:
            raise self._refuse(f"nested repetitions multiply to {product} copies (limit "
                               f"{MAX_NESTED_REPEAT})")
        top.last = product
        top.most = max(top.most, product)

    def _broad_class(self, i: int, end: int) -> bool:
        """Whether the class ``[text[i:end]]`` is broad (see the module doc)."""
        text = self.text
        if i < end and text[i] == "^":
            return True
        count = 0
        while i < end:
            c = text[i]
            if c == "\\" and i + 1 < end:
                e = text[i + 1]
                if e in _BROAD_ESCAPES:
                    return True
                count += 10 if e == "d" else 1
                i += 2
                continue
            if c.isspace():
                return True
            if i + 2 < end and text[i + 1] == "-" and text[i + 2] != "\\":
                count += max(1, ord(text[i + 2]) - ord(c) + 1)
                i += 3
            else:
                count += 1
                i += 1
        return count > BROAD_CLASS_CHARS

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
