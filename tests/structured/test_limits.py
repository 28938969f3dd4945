"""What a constraint may cost: refused when it is parsed (sizes, nested repetitions), and
compiled grammars cached under a budget in bytes. A fake backend: no model, no xgrammar."""

from __future__ import annotations

import json

import pytest

from tokenmill.sampling_params import MAX_CONSTRAINT_LEN, SamplingParams
from tokenmill.structured import StructuredOutputManager, StructuredOutputsParams
from tokenmill.structured.backend import GrammarBackend


class Compiled:
    def __init__(self, size: int) -> None:
        self.memory_size_bytes = size


class FakeBackend(GrammarBackend):
    """Parses anything; compiles to an object of ``SIZE`` bytes; counts compiles."""

    SIZE = 100

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.compiles: list = []

    def parse(self, params):
        return params.cache_key

    def compile(self, grammar):
        self.compiles.append(grammar)
        return Compiled(self.SIZE)

    def new_matcher(self, compiled):
        raise NotImplementedError

    def allocate_bitmask(self, rows):
        raise NotImplementedError

    def fill_bitmask(self, matchers, bitmask, rows):
        raise NotImplementedError

    def apply_bitmask(self, logits, bitmask, rows):
        raise NotImplementedError


def manager(**kw) -> StructuredOutputManager:
    return StructuredOutputManager(object(), 100, backend_factory=FakeBackend, **kw)


def settle(m: StructuredOutputManager) -> None:
    """Waits for the compile worker (one thread): a job queued after the others runs once
    their completion callbacks have run."""
    m._pool.submit(lambda: None).result()


# ---- refused when parsed ---------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    ({"regex": "((ab|[^a]){0,30}){0,30}"}, "regex: a group that can match broad"),
    ({"regex": "((ab|c){0,30}){0,30}"}, "regex: nested repetitions multiply to 900"),
    ({"regex": "(a{0,1000}){0,1000}"}, "regex: nested repetitions"),
    ({"regex": "a{0,1000}{0,1000}"}, "regex: nested repetitions"),
    ({"regex": "a{0,1001}"}, "regex: a repetition bound of 1001"),
    ({"regex": "x{99999999999999999999}"}, "regex: a repetition bound"),
    ({"json": {"type": "string", "pattern": "(x{0,50}){0,50}"}}, "json: nested"),
    ({"json": {"type": "object", "patternProperties": {"(a{9}){99}": {}}}}, "json: nested"),
    ({"grammar": 'root ::= item{0,30}\nitem ::= ("ab" | [^a]){0,30}'}, "grammar: a group"),
    ({"grammar": 'root ::= item{0,30}\nitem ::= ("ab" | "c"){0,30}'}, "grammar: nested"),
    ({"grammar": 'root ::= ([^a] | "ab"){0,30}'}, "grammar: a group that can match broad"),
    ({"grammar": 'root ::= item{0,30}\nitem ::= [^a] | "ab"'}, "grammar: a group"),
    ({"grammar": 'root ::= (" " | "x"){0,30}'}, "grammar: a group"),
    ({"grammar": 'root ::= "a"{0,5000}'}, "grammar: a repetition bound of 5000"),
    # groups of broad characters repeated in copies (seconds per mask fill, measured)
    ({"regex": "(.|..){0,300}"}, "regex: a group that can match broad characters only"),
    ({"regex": "(.|..){0,4}"}, "repeated 4 times"),
    ({"regex": "(.?){0,30}"}, "broad characters"),
    ({"regex": r"(\w+\s?){0,50}"}, "broad characters"),
    ({"regex": r"(\w+ ){0,50}"}, "broad characters"),  # BPE tokens start with a space
    ({"regex": "([^a]|ab){0,30}"}, "broad characters"),
    ({"regex": "(?:..){3}"}, "broad characters"),
    ({"regex": "((.|..)){0,30}"}, "broad characters"),
    ({"regex": "(x|(..)?){0,30}"}, "broad characters"),
    ({"regex": "([a-z]|[a-z][a-z]){0,4}"}, "broad characters"),
    ({"json": {"type": "string", "pattern": "^(.|..){0,50}$"}}, "json: a group"),
])
def test_unbounded_repetitions_are_refused(fields, match):
    m = manager()
    with pytest.raises(ValueError, match=match):
        m.grammar_for(StructuredOutputsParams(**fields))
    assert not m._backend.compiles


@pytest.mark.parametrize("fields", [
    {"regex": r"(\d{1,3}\.){3}\d{1,3}"},
    {"regex": r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}"},
    {"regex": "[a-z]{0,1000}"},
    {"regex": r"\{(a|b){2}\}\p{L}{3}"},
    {"json": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$", "maxLength": 5000}},
    {"grammar": 'root ::= num " + " num\nnum ::= [1-9] [0-9]{0,3}'},
    {"grammar": 'root ::= "(" root{0,3} ")" | "x"'},  # recursion is not repetition
    # groups with a narrow character in every repetition, or one atom: cheap (measured)
    {"regex": "(a|bc){0,100}"},
    {"regex": "(x?){0,100}"},
    {"regex": "([a-z]+,){0,100}"},
    {"regex": r"(\d\d){0,30}"},
    {"regex": "(.){0,300}"},
    {"regex": "(x(.)){0,30}"},
    {"regex": "(.|..){0,2}"},
    {"regex": "(.|..)*"},
    {"json": {"type": "string", "maxLength": 1000}},
    {"grammar": 'root ::= ("a" | "bc"){0,30}'},
    {"grammar": 'root ::= ([a-z]+ ","){0,30}'},
    {"grammar": 'root ::= [^a]{0,300}'},
])
def test_ordinary_constraints_pass(fields):
    m = manager()
    m.grammar_for(StructuredOutputsParams(**fields)).future.result()


@pytest.mark.parametrize("fields,match", [
    ({"choice": [f"c{i}" for i in range(1025)]}, "choice has 1025 entries"),
    ({"choice": ["x" * 40_000, "y" * 40_000]}, "choice holds 80000 characters"),
    ({"json": {"enum": list(range(1025))}}, "json has an enum of 1025"),
    ({"json": {"type": "object", "properties": {"a": {"enum": [str(i) for i in range(20_000)]}}}},
     "enum of 20000"),
    ({"json": "[" * 40_000 + "]" * 40_000}, "json is 80000 characters"),
    ({"json": '{"a":' * 10_000 + "1" + "}" * 10_000}, "json is nested"),
    ({"json": {"description": "x" * MAX_CONSTRAINT_LEN}}, "json is .* characters long"),
    ({"json": {"type": "array", "items": json.loads('{"items": ' * 70 + '{}' + '}' * 70)}},
     "nested more than 64"),
    ({"regex": "a" * (MAX_CONSTRAINT_LEN + 1)}, "regex is 65537 characters"),
    ({"grammar": "root ::= " + '"a" ' * 20_000}, "grammar is .* characters"),
    ({"structural_tag": {"x": "y" * MAX_CONSTRAINT_LEN}}, "structural_tag is"),
    ({"json_object": True, "max_whitespace": 1001}, "max_whitespace"),
])
def test_oversized_constraints_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**fields)
    with pytest.raises(ValueError, match=match):  # as the server builds them
        SamplingParams(structured_outputs=fields)


# ---- the compiled-grammar cache is bounded in bytes ----------------------------------------


def test_the_cache_evicts_least_recently_used_grammars_by_size():
    m = manager(cache_bytes=250)
    regexes = ["a", "b", "c"]
    for r in regexes:
        m.grammar_for(StructuredOutputsParams(regex=r))
        settle(m)
    assert m.cached_bytes == 200 and len(m._cache) == 2  # "a" went when "c" came
    m.grammar_for(StructuredOutputsParams(regex="b"))    # a hit: "b" is now the newest
    settle(m)
    assert len(m._backend.compiles) == 3
    m.grammar_for(StructuredOutputsParams(regex="a"))    # compiled again; "c" goes
    settle(m)
    assert len(m._backend.compiles) == 4
    assert [k[1] for k in m._cache] == ["b", "a"] and m.cached_bytes == 200
    # one grammar larger than the whole budget is used, but not kept
    FakeBackend.SIZE = 1000
    try:
        g = m.grammar_for(StructuredOutputsParams(regex="huge"))
        settle(m)
        assert g.future.result().memory_size_bytes == 1000
        assert m.cached_bytes <= 250 and ("regex", "huge", 20) not in m._cache
    finally:
        FakeBackend.SIZE = 100


def test_a_failed_compile_is_not_cached():
    class Failing(FakeBackend):
        def compile(self, grammar):
            self.compiles.append(grammar)
            raise RuntimeError("out of memory")

    m = StructuredOutputManager(object(), 100, backend_factory=Failing)
    for _ in range(2):
        g = m.grammar_for(StructuredOutputsParams(regex="a"))
        settle(m)
        assert isinstance(g.error(), RuntimeError)
    assert len(m._backend.compiles) == 2 and not m._cache and m.cached_bytes == 0
