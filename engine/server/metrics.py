"""Prometheus metrics under vLLM's names, each labelled with `model_name`, so vLLM dashboards work unchanged.

Engine counters (running / waiting requests, KV cache usage, token totals, preemptions, prefix-cache lookups) are
read from `engine.stats()` (an EngineStats) at scrape time; the server counts finished requests and times each
request itself (`RequestTimer`), since it sees every token the moment it is sent to the client.

Ours beside them: the plan's memory prediction and what start-up measured, per component
(`vdeploy:memory_predicted_bytes` / `vdeploy:memory_measured_bytes`, label `component`: weights, activation,
cuda_graph, overhead, kv_cache), and the process's own figures (`process_resident_memory_bytes` and the like).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vdeploy_engine.config import MemoryBudget
from vdeploy_engine.worker.memory_use import COMPONENTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)

# EngineStats field -> (metric name, help, kind). Counters get Prometheus' `_total` suffix when exposed.
_ENGINE_METRICS = {
    "num_running": ("vllm:num_requests_running", "Requests in the running batch.", "gauge"),
    "num_waiting": ("vllm:num_requests_waiting", "Requests waiting to be scheduled (or swapped out).", "gauge"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "gauge"),
    "prompt_tokens_total": ("vllm:prompt_tokens", "Prompt tokens processed.", "counter"),
    "generation_tokens_total": ("vllm:generation_tokens", "Tokens generated.", "counter"),
    "num_preemptions_total": ("vllm:num_preemptions", "Preemptions since start.", "counter"),
    "prefix_cache_queries_total": (
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        "counter",
    ),
    "prefix_cache_hits_total": ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter"),
}


class _EngineCollector:
    """Reads the engine's counters at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], Any]):
        self.model_name, self.stats = model_name, stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, (name, help_text, kind) in _ENGINE_METRICS.items():
            family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_type(name, help_text, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, key)))
            yield family


class _MemoryCollector:
    """The plan's memory table and the engine's start-up measurement, component by component."""

    def __init__(self, model_name: str, predicted: MemoryBudget | None, measured: dict[str, int]):
        self.model_name, self.predicted, self.measured = model_name, predicted, measured

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "component"]
        predicted = GaugeMetricFamily("vdeploy:memory_predicted_bytes", "The plan's memory prediction.", labels=labels)
        measured = GaugeMetricFamily("vdeploy:memory_measured_bytes", "Memory measured at start-up.", labels=labels)
        for key in COMPONENTS:
            component = [self.model_name, key.removesuffix("_bytes")]
            if self.predicted is not None:
                predicted.add_metric(component, float(getattr(self.predicted, key)))
            if key in self.measured:
                measured.add_metric(component, float(self.measured[key]))
        yield predicted
        yield measured


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        stats: Callable[[], Any],
        predicted: MemoryBudget | None = None,
        measured: dict[str, int] | None = None,
    ):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats))
        self.registry.register(_MemoryCollector(model_name, predicted, measured or {}))
        ProcessCollector(registry=self.registry)
        label = ["model_name"]
        self.request_success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason.",
            label + ["finished_reason"],
            registry=self.registry,
        )
        # The histograms have one label value: their children are taken once here, not looked up per token.
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Seconds between consecutive generated tokens.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Seconds from arrival to the last token.",
            label,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Times one request from arrival: `tokens(n)` whenever n new tokens arrive, `finished(reason)` at the end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = self.last = time.monotonic()
        self.first_token_seen = False

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.time_to_first_token.observe(now - self.arrival)
            self.last = now
            count -= 1
        gap = (now - self.last) / max(count, 1)  # tokens arriving together share the interval
        for _ in range(count):
            self.metrics.inter_token_latency.observe(gap)
        self.last = now

    def finished(self, reason: str) -> None:
        self.metrics.request_success.labels(self.metrics.model_name, reason).inc()
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
