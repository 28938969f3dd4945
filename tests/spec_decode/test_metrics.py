"""Speculative decoding's counters reach the Prometheus exposition with vLLM's names."""

from __future__ import annotations

from tokenmill.engine.async_engine import EngineStats
from tokenmill.engine.spec_decode import SpecDecodeStats
from tokenmill.server.metrics import ServerMetrics


def test_spec_decode_counters_rendered():
    spec = SpecDecodeStats(num_drafts=5, num_draft_tokens=20, num_accepted_tokens=7,
                           accepted_per_pos=[4, 2, 1, 0])
    stats = EngineStats(num_running=0, num_waiting=0, num_queued=0, kv_cache_usage=0.0,
                        num_preemptions=0, spec_decode=spec)
    text = ServerMetrics("m", lambda: stats).render().decode()
    assert 'tokenmill:spec_decode_num_drafts_total{model_name="m"} 5.0' in text
    assert 'tokenmill:spec_decode_num_draft_tokens_total{model_name="m"} 20.0' in text
    assert 'tokenmill:spec_decode_num_accepted_tokens_total{model_name="m"} 7.0' in text
    assert ('tokenmill:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",'
            'position="1"} 2.0') in text
    assert spec.acceptance_rate == 7 / 20 and spec.mean_accepted_length == 1 + 7 / 5
    off = EngineStats(num_running=0, num_waiting=0, num_queued=0, kv_cache_usage=0.0,
                      num_preemptions=0)
    assert "spec_decode" not in ServerMetrics("m", lambda: off).render().decode()
