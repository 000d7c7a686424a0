"""This node's load report, as its peers read it (``GET /fleet/capacity``), twice a second.

``models``: each model this node runs, with ``warm`` (replicas ready), ``room`` (free slots
on them), ``queued`` and ``queue_room``; ``host_free`` and ``gpu_free``: bytes no replica
holds, room for a cold start; ``draining``: it takes no new work; ``specs``: what a peer
needs to describe a model it does not run.
"""

from __future__ import annotations

from typing import Any

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler import ModelDirectory

__all__ = ["node_report", "spec_record"]


def node_report(local: ModelDirectory | None, draining: bool) -> dict[str, Any]:
    models: dict[str, dict[str, int]] = {}
    specs: dict[str, dict[str, Any]] = {}
    host_free = gpu_free = 0
    if local is not None:
        for handle in local:
            models[handle.name] = handle.load()
            specs[handle.name] = spec_record(handle.spec)
        host_free, gpu_free = local.free_memory()
    return {
        "models": models,
        "specs": specs,
        "host_free": host_free,
        "gpu_free": gpu_free,
        "draining": draining,
    }


def spec_record(spec: ModelSpec) -> dict[str, Any]:
    """What a peer needs to describe a model it does not run (metadata, config, OpenAPI)."""
    return {
        **spec.summary(),
        "input_schema": spec.input_schema,
        "output_schema": spec.output_schema,
        "max_batch_size": spec.max_batch_size,
        "batch_dimension": spec.batch_dimension,
        "device": spec.device,
        "is_async": spec.is_async,
        "streaming": spec.streaming,
        "input_schema_exact": spec.input_schema_exact,
        "version": spec.version,
    }
