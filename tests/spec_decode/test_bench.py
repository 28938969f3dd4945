"""The bench side: the grounded dataset and the acceptance figures read from /metrics."""

from __future__ import annotations

from tokenmill.bench.datasets import Calibration, DatasetSpec, build_sessions
from tokenmill.bench.grounded import grounded_prompts, source_files
from tokenmill.bench.report import format_summary
from tokenmill.bench.spec_metrics import spec_counters, spec_summary


def test_grounded_prompts_quote_the_projects_source():
    prompts = grounded_prompts(4, 120, seed=3)
    assert prompts == grounded_prompts(4, 120, seed=3)  # reproducible
    assert "renamed to" in prompts[0] and "quote" in prompts[1]
    sources = [p.read_text() for p in source_files()]
    for p in prompts:
        code = p.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        assert len(code.split()) <= 120 and any(s.startswith(code) for s in sources)
    sessions = build_sessions(DatasetSpec(name="grounded", num_prompts=4, input_len=120,
                                          seed=3), Calibration())
    assert [s.user_turns[0] for s in sessions] == prompts


def test_acceptance_from_metrics_before_and_after():
    def text(drafts, proposed, accepted):
        return "\n".join([
            "# TYPE tokenmill:spec_decode_num_drafts_total counter",
            f'tokenmill:spec_decode_num_drafts_total{{model_name="m"}} {drafts}',
            f'tokenmill:spec_decode_num_draft_tokens_total{{model_name="m"}} {proposed}',
            f'tokenmill:spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted}',
            'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",'
            f'position="0"}} {accepted}'])

    summary = spec_summary(spec_counters(text(10.0, 40.0, 8.0)),
                           spec_counters(text(30.0, 120.0, 48.0)))
    assert summary["spec_decode_acceptance_rate"] == 40 / 80
    assert summary["spec_decode_mean_accepted_length"] == 1 + 40 / 20
    assert spec_summary({}, spec_counters("tokenmill:num_preemptions_total 3")) == {}
    assert spec_summary(spec_counters(text(1, 4, 1)), spec_counters(text(1, 4, 1))) == {}
    m = {k: 0 for k in ("completed", "failed", "duration_s", "total_input_tokens",
                        "total_output_tokens", "mean_input_len", "mean_output_len",
                        "request_throughput", "output_throughput", "peak_output_throughput",
                        "total_token_throughput")}
    m.update({f"{s}_{k}_ms": 0 for k in ("ttft", "tpot", "itl", "e2el")
              for s in ("mean", "p50", "p90", "p99")}, input_len_measured=True, **summary)
    assert "Spec decode acceptance rate (%):" in format_summary(m)


def test_bench_throughput_reports_acceptance(tiny_model_dir, tmp_path, capsys):
    import json

    from tests.cli.test_bench import run_cli

    out = tmp_path / "t.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    assert run_cli(["throughput", "--model", tiny_model_dir("llama"), "--num-prompts", "2",
                    "--input-len", "8", "--output-len", "24", "--kv-cache-memory", "1MiB",
                    "--quantization", "q8_0", "--speculative-config", spec,
                    "--disable-tqdm", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["spec_decode_num_drafts"] > 0 and r["total_output_tokens"] == 48
    assert 0 <= r["spec_decode_acceptance_rate"] <= 1
    assert "Speculative decoding: acceptance rate" in capsys.readouterr().out
