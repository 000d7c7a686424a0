"""One replica of a served model (a worker process and what the scheduler knows of it), and how
many requests a replica is handed at once."""

from __future__ import annotations

import asyncio

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler.backend import Worker
from omni_runtime.scheduler.views import ReplicaState, ReplicaView

__all__ = ["Replica", "pipelines", "replica_capacity"]


def replica_capacity(spec: ModelSpec) -> int:
    """Requests one replica is handed at once (``scaling.max_ongoing_requests``)."""
    if spec.scaling.max_ongoing_requests:
        return spec.scaling.max_ongoing_requests
    if spec.max_batch_size > 1:
        return spec.max_batch_size
    if spec.is_async:
        return 4 * spec.scaling.target_ongoing_requests
    return 1  # a sync engine answers one request at a time


def pipelines(spec: ModelSpec) -> bool:
    """Whether a fast sync replica may hold one request behind the one it runs."""
    return not (spec.scaling.max_ongoing_requests or spec.max_batch_size > 1 or spec.is_async)


class Replica:
    """One worker process of a model, and what the scheduler knows of it."""

    def __init__(self, id: int, worker: Worker, capacity: int, now: float) -> None:
        self.id = id
        self.worker = worker
        self.capacity = capacity
        self.state = ReplicaState.STARTING
        self.in_flight = 0
        self.sequences = 0  # live sequences pinned to it: it is not stopped while it has one
        self.served = 0
        self.last_done = 0.0  # when it last answered
        self.idle_since = now
        self.host_bytes = 0  # its reservation while starting; what it holds now once ready
        self.gpu_bytes = 0
        self.stop_reason: str | None = None  # set when it is stopped on purpose
        self.waking = False  # parked, and its memory is on its way back to its device
        self.on_host = False  # parked (its device memory on the host), until woken
        self.gone = asyncio.Event()  # set once it has left its model's replica list
        self.idle = asyncio.Event()
        self.idle.set()

    def view(self) -> ReplicaView:
        # A parked replica being stopped still holds its memory on the host, not the GPU.
        parked = self.on_host and self.state is ReplicaState.DRAINING
        return ReplicaView(
            id=self.id,
            state=ReplicaState.PARKED if parked else self.state,
            in_flight=self.in_flight + self.sequences,  # (as busy as a request in flight)
            host_bytes=self.host_bytes,
            gpu_bytes=self.gpu_bytes,
            device=self.worker.spec.device,
        )
