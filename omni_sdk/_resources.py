"""Per-engine limits and scaling policy, overridable per deployment in ``omni.toml``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from omni_sdk.units import Bytes, Seconds

__all__ = ["Resources", "Scaling"]


class Resources(BaseModel):
    """What one replica of an engine may use: host memory, GPU memory and CPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: Bytes = Field(default=2 << 30, description="host memory limit, e.g. '2GiB'")
    gpu_memory: Bytes = Field(default=0, description="GPU memory quota, e.g. '4GiB'; 0: none")
    cpus: float = Field(default=1.0, gt=0, description="CPU share, e.g. 0.5 or 2")


class Scaling(BaseModel):
    """How many replicas of an engine run, and when they start and stop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=0, ge=0, description="replicas kept even when idle")
    max_replicas: int = Field(default=4, ge=1, description="replicas at most, however busy")
    idle_timeout: Seconds = Field(
        default=300.0, gt=0, description="a model without requests this long scales down, e.g. '5m'"
    )
    target_ongoing_requests: int = Field(
        default=2, ge=1, description="requests in flight or queued per replica to aim for"
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description="requests one replica is handed at once; default: 1 for a sync engine, "
        "max_batch_size for a batching one, 4 × target_ongoing_requests for an async one",
    )
    max_queue_size: int = Field(
        default=128, ge=1, description="requests waiting per model before 429s"
    )
