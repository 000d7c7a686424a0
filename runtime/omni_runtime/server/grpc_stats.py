"""gRPC ``ModelStatistics``: the same statistics as ``/v2/models/{name}/stats``, as protobuf."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tritonclient.grpc import service_pb2

from omni_runtime.scheduler import ModelHandle

__all__ = ["statistics_response"]

_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")


def statistics_response(models: Iterable[ModelHandle]) -> Any:
    """A ``ModelStatisticsResponse`` for ``models``."""
    response = service_pb2.ModelStatisticsResponse()
    for model in models:
        stats = model.stats.to_json(model.name, model.spec.version)
        entry = response.model_stats.add(
            name=stats["name"],
            version=stats["version"],
            last_inference=stats["last_inference"],
            inference_count=stats["inference_count"],
            execution_count=stats["execution_count"],
        )
        for phase in _PHASES:
            duration = getattr(entry.inference_stats, phase)
            duration.count = stats["inference_stats"][phase]["count"]
            duration.ns = stats["inference_stats"][phase]["ns"]
        for batch in stats["batch_stats"]:
            row = entry.batch_stats.add(batch_size=batch["batch_size"])
            for phase in _BATCH_PHASES:
                duration = getattr(row, phase)
                duration.count = batch[phase]["count"]
                duration.ns = batch[phase]["ns"]
    return response
