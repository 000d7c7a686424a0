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
_PAGE_SIZE = 4096


class _MemoryCollector(Collector):
    """``omni_model_memory_bytes{model,kind="host"}``: resident memory of each model's workers."""

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "omni_model_memory_bytes", "Memory used by a model's workers", labels=["model", "kind"]
        )
        for model, pids in self._pids().items():
            family.add_metric([model, "host"], sum(_rss(pid) for pid in pids))
        yield family


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


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

    def watch_memory(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self.registry.register(_MemoryCollector(pids))

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
