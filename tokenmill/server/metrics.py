"""Prometheus metrics with vLLM's names under the ``tokenmill:`` prefix.

Two sources feed them:

* the engine's state, read at scrape time by a custom collector from
  ``AsyncEngine.stats()``: requests running / waiting, KV cache usage and the total
  number of preemptions (a counter the engine keeps); with data-parallel replicas, one
  sample per replica, labelled ``replica``;
* every request's stream of outputs, watched by ``ServerMetrics.observe()`` as it passes
  to the HTTP handler: token counters, finished requests by reason, and the latency
  histograms (time to first token, inter-token latency, end-to-end latency, queue time)
  computed from the request's ``time.monotonic()`` timestamps.

Each app has its own ``CollectorRegistry``, so several servers (or tests) in one process
do not share counters.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.async_engine import EngineStats
from tokenmill.engine.spec_decode import SpecDecodeStats
from tokenmill.outputs import RequestOutput

# vLLM's buckets, in seconds.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
LABELS = ["model_name"]


class _EngineStateCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, doc, value in (
            ("num_requests_running", "Number of requests running on the engine.",
             s.num_running),
            ("num_requests_waiting", "Number of requests waiting to be scheduled.",
             s.num_queued),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
             s.kv_cache_usage),
            ("kv_cache_touched_perc", "Fraction of KV cache blocks ever used: on CPU the "
             "pool's pages are resident once written, so this is its share of RSS.",
             s.kv_cache_touched),
        ):
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=LABELS)
            g.add_metric([self.model_name], value)
            yield g
        for name, doc, value in (
            ("num_preemptions", "Cumulative number of preempted requests.",
             s.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             s.prefix_cache_hits),
        ):
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=LABELS)
            c.add_metric([self.model_name], value)
            yield c
        if s.spec_decode is not None:
            yield from spec_decode_metrics(self.model_name, s.spec_decode)


def spec_decode_metrics(model_name: str, s: SpecDecodeStats) -> Iterator[Metric]:
    """Speculative decoding's counters, with vLLM's names under our prefix."""
    for name, doc, value in (
        ("spec_decode_num_drafts", "Proposals verified (one per sequence and step).",
         s.num_drafts),
        ("spec_decode_num_draft_tokens", "Proposed tokens verified.", s.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
         s.num_accepted_tokens),
    ):
        c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=LABELS)
        c.add_metric([model_name], value)
        yield c
    c = CounterMetricFamily("tokenmill:spec_decode_num_accepted_tokens_per_pos",
                            "Proposed tokens accepted, by their position in the proposal.",
                            labels=[*LABELS, "position"])
    for pos, value in enumerate(s.accepted_per_pos):
        c.add_metric([model_name, str(pos)], value)
    yield c


class _ReplicaStateCollector(_EngineStateCollector):
    """The same gauges and counters, one sample per data-parallel replica (a ``replica``
    label), read from ``replica_stats()``: [(replica index, EngineStats)]."""

    def __init__(self, model_name: str,
                 replica_stats: Callable[[], list[tuple[int, EngineStats]]]) -> None:
        super().__init__(model_name, lambda: None)
        self.replica_stats = replica_stats

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, stats in self.replica_stats():
            self.stats = lambda s=stats: s
            for family in super().collect():
                kind = type(family)
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = kind(family.name, family.documentation,
                                                     labels=LABELS + ["replica"])
                for sample in family.samples:
                    out.add_metric([self.model_name, str(index)], sample.value)
        yield from merged.values()


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats],
                 replica_stats: Callable[[], list[tuple[int, EngineStats]]] | None = None
                 ) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(model_name, stats)
                               if replica_stats is None
                               else _ReplicaStateCollector(model_name, replica_stats))

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tokenmill:{name}", doc, LABELS, registry=self.registry)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, LABELS, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed."
                                     ).labels(model_name)
        self.generation_tokens = counter("generation_tokens",
                                         "Number of generation tokens processed."
                                         ).labels(model_name)
        self._success = Counter("tokenmill:request_success",
                                "Count of successfully processed requests.",
                                LABELS + ["finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent waiting in the queue in seconds.",
                                    REQUEST_BUCKETS)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return prometheus_client.generate_latest(self.registry)

    async def observe(self, stream: AsyncIterator[RequestOutput]
                      ) -> AsyncIterator[RequestOutput]:
        """Passes a request's outputs through, recording its metrics on the way.

        Outputs are cumulative, so new tokens are counted as the growth of each
        completion. The first output marks the end of prefill (prompt tokens, time to
        first token); the time between later outputs is the inter-token latency (each
        step adds one token to every running completion); the last one finishes the
        request (end-to-end latency, queue time, one success per completion)."""
        last: float | None = None
        seen = 0
        async for out in stream:
            now = time.monotonic()
            if last is None:
                self._first_output(out)
            total = sum(len(o.token_ids) for o in out.outputs)
            if total > seen:
                self.generation_tokens.inc(total - seen)
                if last is not None:
                    self.itl.observe(now - last)
                seen = total
            last = now
            if out.finished:
                self._finish(out, now)
            yield out

    def _first_output(self, out: RequestOutput) -> None:
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        m = out.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)

    def _finish(self, out: RequestOutput, now: float) -> None:
        m = out.metrics
        if m is not None:
            self.e2e.observe(now - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        for o in out.outputs:
            self._success.labels(self.model_name, o.finish_reason or "abort").inc()
