"""``omni_requests_total`` and ``omni_request_duration_seconds`` are counted without locks
(``metrics.py``) and still read as prometheus_client's own Counter and Histogram write them."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from omni_runtime.metrics import _LATENCY_BUCKETS, Metrics

ANSWERS = [
    ("@a/b", "1.0", 200, 0.0001),
    ("@a/b", "1.0", 200, 0.0005),  # on a bound: counted in it
    ("@a/b", "1.0", 200, 0.003),
    ("@a/b", "1.0", 503, 0.2),
    ("@a/b", "1.0", 200, 45.0),  # over every bound
    ("@c/d", "2", 429, 0.01),
    ("@a/b", "2.0", 200, 1.0),
]


def _requests_text(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    text = re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)  # when: not compared
    return "\n".join(line for line in text.splitlines() if "omni_request" in line)


def test_the_requests_read_as_prometheus_clients_counter_and_histogram_write_them() -> None:
    reference = CollectorRegistry()
    requests = Counter(
        "omni_requests", "Requests answered, by model, version and HTTP status",
        ["model", "version", "status"], registry=reference,
    )  # fmt: skip
    duration = Histogram(
        "omni_request_duration_seconds", "Time from request to response",
        ["model", "version"], buckets=_LATENCY_BUCKETS, registry=reference,
    )  # fmt: skip
    metrics = Metrics()
    for model, version, status, seconds in ANSWERS:
        requests.labels(model, version, str(status)).inc()
        duration.labels(model, version).observe(seconds)
        metrics.observe(model, version, status, seconds)
    ours = _requests_text(metrics.registry)
    assert 'omni_requests_total{model="@a/b",status="200",version="1.0"} 4.0' in ours
    assert ours == _requests_text(reference)
