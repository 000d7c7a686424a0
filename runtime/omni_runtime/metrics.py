"""Prometheus metrics of one runtime (``GET /metrics``)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["Metrics", "ModelGauges"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BUCKET_LABELS = (*(repr(bound) for bound in _LATENCY_BUCKETS), "+Inf")  # as Prometheus writes them


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


class _Answers:
    """One model version's answers: by status, and their durations' histogram."""

    __slots__ = ("buckets", "by_status", "created", "since", "total")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.created: dict[int, float] = {}  # when each status was first counted
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last: over every bound
        self.total = 0.0  # seconds
        self.since = time.time()


class _RequestCollector(Collector):
    """``omni_requests_total`` and ``omni_request_duration_seconds``, as prometheus_client's
    Counter and Histogram show them, counted without their locks: one answer costs a few
    additions (``Metrics.observe``, on the event loop), the families are made when scraped."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], _Answers] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "omni_requests",
            "Requests answered, by model, version and HTTP status",
            labels=["model", "version", "status"],
        )
        duration = HistogramMetricFamily(
            "omni_request_duration_seconds",
            "Time from request to response",
            labels=["model", "version"],
        )
        for (model, version), answers in list(self.answers.items()):
            for status, count in list(answers.by_status.items()):
                created = answers.created[status]
                requests.add_metric([model, version, str(status)], count, created=created)
            cumulative, running = [], 0
            for bound, count in zip(_BUCKET_LABELS, answers.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            duration.add_metric([model, version], cumulative, answers.total)
            labels = {"model": model, "version": version}
            duration.samples.append(Sample(duration.name + "_created", labels, answers.since))
        yield requests
        yield duration


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
        self._requests = _RequestCollector()
        r.register(self._requests)
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

    def watch_models(self, gauges: Callable[[], list[ModelGauges]]) -> None:
        """``gauges()`` gives each model version's replicas, queue depth and memory at scrape
        time."""
        self.registry.register(_ModelCollector(gauges))

    def watch_batches(self, counts: Callable[[], dict[str, int]]) -> None:
        """``counts()`` gives batch items by state (queued, running, done, failed) at scrape."""
        self.registry.register(_BatchCollector(counts))

    def observe(self, model: str, version: str, status: int, seconds: float) -> None:
        """Count one answered request (on the event loop: the hot path takes no lock)."""
        answers = self._requests.answers.get((model, version))
        if answers is None:
            answers = self._requests.answers[(model, version)] = _Answers()
        by_status = answers.by_status
        if status in by_status:
            by_status[status] += 1
        else:
            by_status[status] = 1
            answers.created[status] = time.time()
        answers.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        answers.total += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)
