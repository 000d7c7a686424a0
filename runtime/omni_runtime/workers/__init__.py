"""Worker processes: spawning, watching and talking to one replica of one model."""

from __future__ import annotations

from omni_runtime.scheduler.backend import LoadFailed, Response, StartTimings, WorkerGone
from omni_runtime.workers.backend import LocalWorkers
from omni_runtime.workers.channel import WorkerChannel
from omni_runtime.workers.supervisor import WorkerProcess, describe_exit

__all__ = [
    "LoadFailed",
    "LocalWorkers",
    "Response",
    "StartTimings",
    "WorkerChannel",
    "WorkerGone",
    "WorkerProcess",
    "describe_exit",
]
