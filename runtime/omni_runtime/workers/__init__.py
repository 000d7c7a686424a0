"""Worker processes: spawning, watching and talking to one replica of one model."""

from __future__ import annotations

from omni_runtime.workers.channel import Response, WorkerChannel, WorkerGone
from omni_runtime.workers.supervisor import LoadFailed, StartTimings, WorkerProcess, describe_exit

__all__ = [
    "LoadFailed",
    "Response",
    "StartTimings",
    "WorkerChannel",
    "WorkerGone",
    "WorkerProcess",
    "describe_exit",
]
