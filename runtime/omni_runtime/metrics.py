"""Prometheus metrics of one runtime (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "ModelGauges"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


@dataclass(frozen=True)
class ModelGauges:
    """A model's state at scrape time: one version of it (``model`` is its plain name)."""

    model: str
    version: str
    replicas: int  # ready replicas (0 when scaled to zero)
    parked: int  # replicas whose device memory waits on the host
    queued: int  # requests waiting in the runtime for a replica
    host_bytes: int  # memory its workers use
    gpu_bytes: int


class _ModelCollector(Collector):
    """Gauges read when scraped: replicas, queue depth and memory of each model's versions."""

    def __init__(self, gauges: Callable[[], list[ModelGauges]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replicas = GaugeMetricFamily(
            "omni_model_replicas",
            "Ready replicas (0 when scaled to zero)",
            labels=["model", "version"],
        )
        parked = GaugeMetricFamily(
            "omni_model_parked_replicas",
            "Replicas parked: process alive, device memory on the host until the next request",
            labels=["model", "version"],
        )
        queued = GaugeMetricFamily(
            "omni_model_queue_depth",
            "Requests waiting in the runtime for a replica",
            labels=["model", "version"],
        )
        memory = GaugeMetricFamily(
            "omni_model_memory_bytes",
            "Memory used by a model's workers",
            labels=["model", "version", "kind"],
        )
        for g in self._gauges():
            labels = [g.model, g.version]
            replicas.add_metric(labels, g.replicas)
            parked.add_metric(labels, g.parked)
            queued.add_metric(labels, g.queued)
            memory.add_metric([*labels, "host"], g.host_bytes)
            memory.add_metric([*labels, "gpu"], g.gpu_bytes)
        yield replicas
        yield parked
        yield queued
        yield memory


class _BatchCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        items = GaugeMetricFamily(
            "omni_batch_items",
            "Items of asynchronous batches on this node, by state (queued, running, done, failed)",
            labels=["state"],
        )
        for state, count in self._counts().items():
            items.add_metric([state], count)
        yield items


class Metrics:
    """Every metric the runtime exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "omni_requests", "Requests answered, by model, version and HTTP status",
            ["model", "version", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "omni_request_duration_seconds", "Time from request to response",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cold_starts = Counter(
            "omni_model_cold_starts", "Worker processes started", ["model", "version"],
            registry=r,
        )  # fmt: skip
        self.wakes = Counter(
            "omni_model_wakes", "Parked replicas woken for a request", ["model", "version"],
            registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "omni_model_evictions",
            "Replicas stopped or parked, not by an operator "
            "(idle, scale_down, memory, crash, oom, hung)",
            ["model", "version", "reason"], registry=r,
        )  # fmt: skip
        self.prewarm_refusals = Counter(
            "omni_prewarm_refusals",
            "Pre-warmed processes that would not fork workers, by model and reason "
            "(outside_base, threads, exited, failed)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.cold_start = Histogram(
            "omni_cold_start_seconds",
            "Phases of a replica's cold start: env, spawn, import, load, first_response",
            ["model", "version", "phase"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.load_seconds = Histogram(
            "omni_model_load_duration_seconds", "Spawn to ready, per worker",
            ["model", "version"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.rollouts = Counter(
            "omni_rollouts",
            "Rollouts of a new model version, by outcome "
            "(promoted, rolled_back, failed, aborted)",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self._children: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def watch_models(self, gauges: Callable[[], list[ModelGauges]]) -> None:
        """``gauges()`` gives each model version's replicas, queue depth and memory at scrape
        time."""
        self.registry.register(_ModelCollector(gauges))

    def watch_batches(self, counts: Callable[[], dict[str, int]]) -> None:
        """``counts()`` gives batch items by state (queued, running, done, failed) at scrape."""
        self.registry.register(_BatchCollector(counts))

    def observe(self, model: str, version: str, status: int, seconds: float) -> None:
        """Count one answered request; label children are cached for the hot path."""
        key = (model, version, status)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(model, version, str(status))
        counter.inc()
        histogram = self._durations.get(key[:2])
        if histogram is None:
            histogram = self._durations[key[:2]] = self.duration.labels(model, version)
        histogram.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
