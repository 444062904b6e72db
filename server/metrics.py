"""Prometheus metrics (prometheus_client), one registry per app so several apps can live in a process.

Counters and histograms are updated by the routes; engine gauges (running / waiting requests, KV
blocks, prefix-cache hit rate, preemptions) are read from each engine's stats() at scrape time.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# engine stats() key -> (metric name, help)
_ENGINE_GAUGES = {
    "running": ("jang_requests_running", "Requests being decoded"),
    "waiting": ("jang_requests_waiting", "Requests waiting to be scheduled"),
    "blocks_used": ("jang_kv_blocks_used", "KV cache blocks in use"),
    "blocks_free": ("jang_kv_blocks_free", "KV cache blocks free"),
    "blocks_cached": ("jang_kv_blocks_cached", "Free KV blocks still holding a reusable prefix"),
    "prefix_hit_rate": ("jang_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache"),
    "preemptions": ("jang_preemptions", "Requests preempted so far"),
}


class _EngineCollector:
    def __init__(self, registry_of_models):
        self._models = registry_of_models

    def collect(self):
        fams = {k: GaugeMetricFamily(n, h, labels=["model"]) for k, (n, h) in _ENGINE_GAUGES.items()}
        for name, stats in self._models.engine_stats().items():
            for key, fam in fams.items():
                value = stats.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fam.add_metric([name], float(value))
        yield from fams.values()


class Metrics:
    def __init__(self, models=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("jang_http_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter("jang_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("jang_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.cached_tokens = Counter("jang_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     ["model"], registry=r)
        self.ttft = Histogram("jang_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("jang_time_per_output_token_seconds", "Mean time between output tokens",
                              ["model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                              registry=r)
        self.e2e = Histogram("jang_request_duration_seconds", "Time from request to last token",
                             ["model"], buckets=_LATENCY, registry=r)
        self.aborted = Counter("jang_requests_aborted", "Requests aborted by a client disconnect", ["model"],
                               registry=r)
        if models is not None:
            r.register(_EngineCollector(models))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one generation: first token, mean time per later token, total."""

    def __init__(self, metrics: Metrics, model: str):
        self.m, self.model = metrics, model
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.labels(self.model).observe(self.first - self.start)

    def finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        end = time.perf_counter()
        self.m.e2e.labels(self.model).observe(end - self.start)
        self.m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.m.generation_tokens.labels(self.model).inc(completion_tokens)
        if cached_tokens:
            self.m.cached_tokens.labels(self.model).inc(cached_tokens)
        if self.first is not None and completion_tokens > 1:
            self.m.tpot.labels(self.model).observe((end - self.first) / (completion_tokens - 1))
