"""tokenmill bench: serve against a fake streaming OpenAI server; throughput and latency on
a tiny random-weight model. Checks shapes and bookkeeping, never speed."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokenmill.bench import add_bench_parser
from tokenmill.bench.arrivals import arrival_offsets
from tokenmill.bench.client import RequestRecord, normalize_base_url
from tokenmill.bench.datasets import Calibration, DatasetSpec, build_sessions
from tokenmill.bench.metrics import parse_slo, summarize


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


# ---- a fake OpenAI-compatible server ------------------------------------------------


class FakeServer:
    """Streams ``max_tokens`` fake tokens per request (1 ms apart) with a final usage
    chunk. A prompt's tokens are its whitespace-separated words plus a BOS (and a role
    marker per chat message); ``cached_tokens`` is the longest token prefix shared with
    any earlier request, like a prefix cache that never evicts. Every ``fail_every``-th
    request gets HTTP 500; a body holding the field ``reject`` gets HTTP 400; with
    ``stream_usage`` False streams end without a usage chunk (llama-cpp-python)."""

    def __init__(self, fail_every: int = 0, reject: str | None = None,
                 stream_usage: bool = True) -> None:
        self.bodies: list[dict] = []
        self.answers: list[str] = []
        self.seen: list[list[str]] = []
        self.fail_every = fail_every
        self.reject = reject
        self.stream_usage = stream_usage
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def tokens(body: dict) -> list[str]:
        if "messages" in body:
            toks = ["<bos>"]
            for m in body["messages"]:
                toks += [f"<{m['role']}>"] + m["content"].split()
            return toks
        return ["<bos>"] + body["prompt"].split()

    def admit(self, body: dict) -> tuple[int, int, int, bool]:
        """Records a request; returns (index, prompt tokens, cached tokens, fail)."""
        toks = self.tokens(body)
        with self.lock:
            cached = 0
            for prev in self.seen:
                n = 0
                while n < min(len(prev), len(toks) - 1) and prev[n] == toks[n]:
                    n += 1
                cached = max(cached, n)
            self.seen.append(toks)
            self.bodies.append(body)
            index = len(self.bodies) - 1
        fail = bool(self.fail_every) and (index + 1) % self.fail_every == 0
        return index, len(toks), cached, fail

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send_json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})
                else:
                    self.send_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path == "/v1/chat/completions"
                index, n_prompt, cached, fail = fake.admit(body)
                if fail:
                    self.send_json(500, {"error": {"message": "injected failure"}})
                    return
                if fake.reject in body:
                    self.send_json(400, {"error": {"message": f"unknown {fake.reject}"}})
                    return
                n = body["max_tokens"]
                pieces = [f" r{index}t{i}" for i in range(n)]
                with fake.lock:
                    fake.answers.append("".join(pieces))
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n,
                         "total_tokens": n_prompt + n,
                         "prompt_tokens_details": {"cached_tokens": cached}}
                if not body.get("stream"):
                    self.send_json(200, {"choices": [{"text": "".join(pieces)}],
                                         "usage": usage})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(0.003)
                for piece in pieces:
                    choice = ({"index": 0, "delta": {"content": piece}} if chat
                              else {"index": 0, "text": piece})
                    self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.001)
                if fake.stream_usage:
                    final = {"choices": [], "usage": usage}
                    self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        return Handler


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def serve_args(url: str, *extra: str) -> list[str]:
    return ["serve", "--base-url", url, "--disable-tqdm", *extra]


# ---- bench serve ----------------------------------------------------------------------


def test_serve_random_metrics_json_and_plot(fake, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    plot_args = ["--plot", str(png)] if _has_matplotlib() else []
    rc = run_cli(serve_args(fake.url + "/v1/", "--num-prompts", "12", "--input-len", "20",
                            "--output-len", "8", "--max-concurrency", "4",
                            "--slo", "ttft=60000,tpot=60000", "--result-json", str(out),
                            *plot_args))
    assert rc == 0
    doc = json.loads(out.read_text())
    m = doc["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (12, 0, 96)
    assert m["mean_input_len"] == 20  # calibrated: words + BOS
    assert doc["config"]["calibration"]["measured"]
    assert m["num_output_len_mismatch"] == 0
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < m[f"p50_{key}_ms"] <= m[f"p90_{key}_ms"] <= m[f"p99_{key}_ms"]
        assert m[f"mean_{key}_ms"] > 0
    assert m["goodput"] == pytest.approx(m["request_throughput"])
    assert m["output_throughput"] == pytest.approx(96 / m["duration_s"])
    assert 0 <= m["prefix_cache_hit_rate"] < 0.2  # random prompts barely overlap
    assert sum(m["output_throughput_per_s"]) == pytest.approx(96)
    assert "api_key" not in doc["config"]
    reqs = doc["requests"]
    assert len(reqs) == 12 and all(len(r["token_times"]) == 8 for r in reqs)
    assert all(r["success"] and r["prompt_tokens"] == 20 for r in reqs)
    # EOS handling without --ban-token-ids: the vLLM extras; usage requested.
    body = fake.bodies[-1]
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"
    assert "logit_bias" not in body
    if plot_args:
        assert png.stat().st_size > 10_000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_serve_tight_slo_ban_ids_and_chat(fake, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert run_cli(serve_args(fake.url, "--num-prompts", "4", "--input-len", "12",
                              "--output-len", "3", "--endpoint", "chat", "--ban-token-ids",
                              "0,2", "--slo", "ttft=0.001", "--result-json", str(out))) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["completed"] == 4 and m["goodput"] == 0 and m["slo_attainment"] == 0
    assert m["mean_input_len"] == 12  # the chat markup is calibrated away
    body = fake.bodies[-1]
    assert body["logit_bias"] == {"0": -100, "2": -100} and "ignore_eos" not in body
    assert body["messages"][0]["role"] == "user"
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_serve_failures_in_summary(tmp_path):
    server = FakeServer(fail_every=3)  # requests 0, 1 are the calibration probes
    out = tmp_path / "f.json"
    try:
        run_cli(serve_args(server.url, "--num-prompts", "9", "--input-len", "5",
                           "--output-len", "2", "--max-concurrency", "1",
                           "--result-json", str(out)))
    finally:
        server.close()
    m = json.loads(out.read_text())["metrics"]
    assert (m["completed"], m["failed"]) == (6, 3)
    assert "injected failure" in m["first_error"]


def test_serve_without_stream_usage_counts_chunks(tmp_path):
    server = FakeServer(stream_usage=False)
    out = tmp_path / "u.json"
    try:
        assert run_cli(serve_args(server.url, "--num-prompts", "3", "--input-len", "10",
                                  "--output-len", "5", "--result-json", str(out))) == 0
    finally:
        server.close()
    m = json.loads(out.read_text())["metrics"]
    assert m["total_output_tokens"] == 15 and not m["input_len_measured"]
    assert m["mean_input_len"] == 10  # the calibrated estimate
    assert "prefix_cache_hit_rate" not in m


def test_server_rejecting_ignore_eos_gets_a_hint():
    server = FakeServer(reject="ignore_eos")
    try:
        with pytest.raises(ValueError, match="--ban-token-ids"):
            run_cli(serve_args(server.url, "--num-prompts", "1"))
        assert run_cli(serve_args(server.url, "--num-prompts", "1", "--output-len", "2",
                                  "--ban-token-ids", "0")) == 0
    finally:
        server.close()


def test_shared_prefix_requests_share_their_group_prefix(fake, tmp_path):
    out = tmp_path / "s.json"
    assert run_cli(serve_args(fake.url, "--dataset", "shared-prefix", "--num-groups", "2",
                              "--num-prompts", "6", "--prefix-len", "40", "--input-len",
                              "10", "--output-len", "2", "--max-concurrency", "1",
                              "--result-json", str(out))) == 0
    bodies = fake.bodies[2:]  # after the calibration probes
    prefixes = [b["prompt"].split("\n\n")[0] for b in bodies]
    questions = [b["prompt"].split("\n\n")[1] for b in bodies]
    assert prefixes[0] != prefixes[1] and prefixes[::2] == [prefixes[0]] * 3
    assert prefixes[1::2] == [prefixes[1]] * 3
    assert len(set(questions)) == 6
    assert len(prefixes[0].split()) == 39  # 40 tokens with the BOS
    doc = json.loads(out.read_text())
    assert [r["group"] for r in doc["requests"]] == [0, 1, 0, 1, 0, 1]
    m = doc["metrics"]
    assert m["mean_input_len"] == pytest.approx(50)
    # Only the first request of each group misses its 40-token prefix.
    assert m["prefix_cache_hit_rate"] == pytest.approx(4 * 40 / (6 * 50), abs=0.02)


def test_multi_turn_requests_grow_with_previous_answers(fake, tmp_path):
    out = tmp_path / "m.json"
    assert run_cli(serve_args(fake.url, "--dataset", "multi-turn", "--num-conversations",
                              "2", "--turns", "3", "--input-len", "8", "--output-len", "3",
                              "--result-json", str(out))) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["endpoint"] == "chat" and doc["metrics"]["completed"] == 6
    reqs = doc["requests"]
    assert [(r["session"], r["turn"]) for r in reqs] == [(s, t) for s in (0, 1)
                                                         for t in range(3)]
    by_conversation: dict[str, list[list[dict]]] = {}
    for body in fake.bodies[2:]:
        by_conversation.setdefault(body["messages"][0]["content"], []).append(
            body["messages"])
    assert len(by_conversation) == 2
    for turns in by_conversation.values():
        assert [len(m) for m in turns] == [1, 3, 5]
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later[:len(earlier)] == earlier  # the previous request is a prefix
            answer = later[len(earlier)]
            assert answer["role"] == "assistant" and answer["content"] in fake.answers
    for r_prev, r_next in zip(reqs, reqs[1:], strict=False):
        if r_prev["session"] == r_next["session"]:
            assert r_next["prompt_tokens"] > r_prev["prompt_tokens"] + 3
            assert r_next["start"] >= r_prev["start"] + r_prev["latency"] - 1e-3
    assert doc["metrics"]["prefix_cache_hit_rate"] > 0.3


def test_poisson_arrivals_are_reproducible(fake, tmp_path):
    a = arrival_offsets(2000, request_rate=50.0, seed=7)
    assert a == arrival_offsets(2000, request_rate=50.0, seed=7)
    assert a != arrival_offsets(2000, request_rate=50.0, seed=8)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:], strict=False))
    assert a[-1] / 1999 == pytest.approx(1 / 50, rel=0.1)  # mean gap 1/rate
    assert arrival_offsets(3, float("inf")) == [0.0, 0.0, 0.0]
    out = tmp_path / "p.json"
    assert run_cli(serve_args(fake.url, "--num-prompts", "8", "--input-len", "4",
                              "--output-len", "2", "--request-rate", "40", "--seed", "3",
                              "--result-json", str(out))) == 0
    starts = [r["start"] for r in json.loads(out.read_text())["requests"]]
    for start, planned in zip(starts, arrival_offsets(8, 40.0, seed=3), strict=True):
        assert planned - 0.005 <= start <= planned + 0.5


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    with pytest.raises(ValueError, match="cannot reach an OpenAI-compatible server"):
        run_cli(serve_args(f"http://127.0.0.1:{port}", "--num-prompts", "1"))


def test_flag_validation():
    with pytest.raises(ValueError, match="--slo"):
        parse_slo("ttft500")
    with pytest.raises(ValueError, match="metrics ttft"):
        parse_slo("latency=5")
    assert parse_slo("ttft=500,tpot=50,e2e=9000") == {"ttft": 500, "tpot": 50, "e2el": 9000}
    with pytest.raises(ValueError, match="--num-groups"):
        DatasetSpec(name="shared-prefix", num_groups=0)
    with pytest.raises(ValueError, match="--base-url"):
        normalize_base_url("localhost:8000")
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    with pytest.raises(ValueError, match="--ban-token-ids"):
        run_cli(serve_args("http://127.0.0.1:9", "--ban-token-ids", "eos"))


def test_calibration_and_sessions():
    c = Calibration.fit((16, 80), (21, 117))  # 1.5 tokens per word, minus 3
    assert (c.slope, c.intercept) == (1.5, -3.0)
    assert c.tokens_for(c.words_for(200)) == pytest.approx(200, abs=1)
    with pytest.raises(ValueError, match="calibrate"):
        Calibration.fit((16, 80), (30, 30))
    spec = DatasetSpec(name="multi-turn", num_conversations=3, turns=2, input_len=10)
    sessions = build_sessions(spec, Calibration())
    assert spec.num_requests == 6 and [len(s.user_turns) for s in sessions] == [2, 2, 2]
    assert sessions == build_sessions(spec, Calibration())  # seeded


def test_summarize_goodput_loose_and_tight():
    def rec(ttft: float, latency: float, n: int) -> RequestRecord:
        times = [ttft + i * (latency - ttft) / (n - 1) for i in range(n)]
        return RequestRecord(0, 0, 10, start=0.0, success=True, token_times=times,
                             latency=latency, prompt_tokens=10, completion_tokens=n,
                             cached_tokens=5)

    records = [rec(0.1, 1.1, 11), rec(0.3, 2.3, 11), RequestRecord(0, 0, 10, error="x")]
    m = summarize(records, duration=4.0, slos={"ttft": 200, "tpot": 150})
    assert (m["completed"], m["failed"]) == (1 + 1, 1)
    assert m["goodput"] == pytest.approx(1 / 4.0)  # only the first meets ttft<=200ms
    assert m["mean_tpot_ms"] == pytest.approx(150)
    assert m["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert summarize(records, 4.0, {"ttft": 1000})["goodput"] == pytest.approx(2 / 4.0)


# ---- bench throughput / latency on a tiny model -------------------------------------


def test_bench_throughput_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert run_cli(["throughput", "--model", tiny_model_dir("llama"), "--num-prompts", "3",
                    "--input-len", "8", "--output-len", "4", "--kv-cache-memory", "1MiB",
                    "--disable-tqdm", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (24, 12)
    assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    assert "output tokens/s" in capsys.readouterr().out


def test_bench_latency_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert run_cli(["latency", "--model", tiny_model_dir("llama"), "--batch-size", "2",
                    "--input-len", "8", "--output-len", "4", "--num-iters", "3",
                    "--num-iters-warmup", "1", "--kv-cache-memory", "1MiB",
                    "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["total_s"]) == 3
    for key in ("total_ms", "prefill_ms", "decode_per_token_ms"):
        assert 0 < r[key]["p50"] <= r[key]["p90"]
    assert r["total_ms"]["mean"] > r["prefill_ms"]["mean"]
    assert "decode per token" in capsys.readouterr().out


def test_bench_offline_rejects_too_long(tiny_model_dir):
    with pytest.raises(ValueError, match="--input-len"):
        run_cli(["latency", "--model", tiny_model_dir("llama"), "--input-len", "500",
                 "--output-len", "100", "--kv-cache-memory", "1MiB"])
