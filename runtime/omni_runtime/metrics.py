"""Prometheus metrics of one runtime (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _MemoryCollector(Collector):
    """``omni_model_memory_bytes{model,kind}``: host and GPU memory held by each model's workers."""

    def __init__(self, usage: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "omni_model_memory_bytes", "Memory used by a model's workers", labels=["model", "kind"]
        )
        for model, (host, gpu) in self._usage().items():
            family.add_metric([model, "host"], host)
            family.add_metric([model, "gpu"], gpu)
        yield family


class Metrics:
    """Every metric the runtime exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "omni_requests", "Requests answered, by model and HTTP status", ["model", "status"],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "omni_request_duration_seconds", "Time from request to response", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.replicas = Gauge("omni_model_replicas", "Ready replicas", ["model"], registry=r)
        self.cold_starts = Counter(
            "omni_model_cold_starts", "Worker processes started", ["model"], registry=r
        )
        self.evictions = Counter(
            "omni_model_evictions", "Replicas stopped other than on request", ["model", "reason"],
            registry=r,
        )  # fmt: skip
        self.load_seconds = Histogram(
            "omni_model_load_duration_seconds", "Spawn to ready, per worker", ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self._children: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def watch_memory(self, usage: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """``usage()`` maps each model to the (host, GPU) memory its workers use now."""
        self.registry.register(_MemoryCollector(usage))

    def observe(self, model: str, status: int, seconds: float) -> None:
        """Count one answered request; label children are cached for the hot path."""
        counter = self._children.get((model, status))
        if counter is None:
            counter = self._children[(model, status)] = self.requests.labels(model, str(status))
        counter.inc()
        histogram = self._durations.get(model)
        if histogram is None:
            histogram = self._durations[model] = self.duration.labels(model)
        histogram.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
