"""What the policy decides: start, stop, park or wake a replica, or say that none fits."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Blocked",
    "Decision",
    "ParkReplica",
    "StartReplica",
    "StopReplica",
    "WakeReplica",
]


@dataclass(frozen=True)
class StartReplica:
    model: str
    device: str
    reason: str


@dataclass(frozen=True)
class StopReplica:
    model: str
    replica: int
    reason: str
    cause: str  # the metric label: "idle", "scale_down" or "memory"


@dataclass(frozen=True)
class ParkReplica:
    """Move an idle replica's device memory to the host, keeping its process."""

    model: str
    replica: int
    reason: str
    cause: str  # the metric label: "memory" (to make room) or "idle"


@dataclass(frozen=True)
class WakeReplica:
    """Bring a parked replica's memory back to its device: it serves again."""

    model: str
    replica: int
    reason: str


@dataclass(frozen=True)
class Blocked:
    """The model needs a replica and none fits, even after every possible eviction."""

    model: str
    reason: str
    host_memory: bool = False  # short of host memory (rather than of a GPU's)


Decision = StartReplica | StopReplica | ParkReplica | WakeReplica | Blocked
