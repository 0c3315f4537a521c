"""Prometheus metrics of one server (a registry per app, so several apps in one process do not mix).

Engine state (requests running and waiting, KV pages, compressions, evicted tokens, preemptions,
prefix-cache hits) is read at scrape time from the stats the engine loop publishes after every
step; token counts and latencies are recorded by the engine loop as it delivers tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "zipage:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0)


class EngineCollector(Collector):
    """Gauges and engine counters from the latest published engine stats."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        label = ["model_name"], [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=label[0])
            g.add_metric(label[1], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=label[0])
            c.add_metric(label[1], value)
            return c

        used = s["total_pages"] - s["free_pages"]
        yield gauge("num_requests_running", "Sequences running in the engine.", s["running"])
        yield gauge("num_requests_waiting", "Sequences waiting to be admitted.", s["waiting"])
        yield gauge("kv_pages_used", "KV pages in use.", used)
        yield gauge("kv_pages_free", "KV pages free.", s["free_pages"])
        yield gauge("kv_pages_total", "KV pages in the pool.", s["total_pages"])
        yield gauge("kv_cache_usage_perc", "Share of the KV pool in use (1 is full).", used / max(s["total_pages"], 1))
        yield counter("compressions", "Sequence compressions (each keeps its budget of tokens).", s["compressions"])
        yield counter("evicted_tokens", "Tokens dropped from KV caches by compressions.", s["evicted_tokens"])
        yield counter("num_preemptions", "Sequences preempted (freed and recomputed later).", s["preemptions"])
        yield counter("prefix_cache_hits", "Prompt pages found in the prefix cache.", s["prefix_cache_hits"])


class ServerMetrics:
    """The registry of one app and the recorders the engine loop calls."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats, model_name))
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests taken.", **labels)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", **labels)
        self.success = Counter(PREFIX + "request_success",
                               "Samples finished (each of a request's n), by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token.",
                              buckets=LATENCY_BUCKETS, **labels)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a sample.",
                             buckets=LATENCY_BUCKETS, **labels)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=REQUEST_BUCKETS, **labels)
        self.model_name = model_name
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)  # (exported as 0 before the first request)

    # called from the engine loop
    def request_added(self, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def tokens(self, n: int, ttft: float | None, itl: float | None) -> None:
        self.generation_tokens.labels(self.model_name).inc(n)
        if ttft is not None:
            self.ttft.labels(self.model_name).observe(ttft)
        if itl is not None:
            h = self.itl.labels(self.model_name)
            for _ in range(n):
                h.observe(itl)

    def request_finished(self, reasons: list[str | None], seconds: float) -> None:
        """A request ended: each of its samples (``n``) by its own finish reason, as vLLM counts them."""
        for reason in reasons:
            self.success.labels(self.model_name, reason or "unknown").inc()
        self.e2e.labels(self.model_name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
