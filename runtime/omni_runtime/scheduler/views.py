"""What the policy sees: each replica and model as plain data, the node's memory budgets, and
the memory a replica holds on the host and on its GPU."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from omni_sdk import Scaling

__all__ = [
    "ACTIVE",
    "ModelView",
    "NodeView",
    "ReplicaState",
    "ReplicaView",
    "gpu_held",
    "gpu_key",
    "host_held",
]


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    PARKED = "parked"  # its process lives; its device memory is on the host
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE = (ReplicaState.STARTING, ReplicaState.READY)  # the states that count towards its size
_HOLDING = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.PARKED, ReplicaState.DRAINING)


@dataclass
class ReplicaView:
    """One replica as the policy sees it."""

    id: int
    state: ReplicaState
    in_flight: int = 0
    host_bytes: int = 0  # reserved while starting, measured once ready
    gpu_bytes: int = 0  # on its device; on the host while it is parked
    device: str = "cpu"


@dataclass
class ModelView:
    """One model as the policy sees it."""

    name: str
    scaling: Scaling
    host_bytes: int  # what a new replica reserves: the footprint measured last time, else the limit
    gpu_bytes: int = 0
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    queued: int = 0
    in_flight: int = 0
    arrived: int = 0  # requests that arrived since the last decision
    load_seconds: float = 1.0  # how long a start took last time (the cost of a cold start)
    wake_seconds: float = 0.0  # what waking a parked replica costs (its GPU memory over PCIe)
    recent_requests: float = 0.0  # requests over the stable window: its expected reuse
    serving: bool = True  # False when unloaded by an operator or failed to load
    not_before: float = 0.0  # no new replica before this (backoff after crashes)
    replicas: list[ReplicaView] = field(default_factory=list)
    # Replicas that count towards its size (starting or ready), and parked ones.
    active: list[ReplicaView] = field(init=False, repr=False)
    parked: list[ReplicaView] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.active = [r for r in self.replicas if r.state in ACTIVE]
        self.parked = [r for r in self.replicas if r.state is ReplicaState.PARKED]


@dataclass
class NodeView:
    """The node's budgets: host memory for all replicas, each GPU's memory times overcommit."""

    host_memory: int
    gpu_budgets: dict[str, int] = field(default_factory=dict)  # "cuda:0" -> bytes


def host_held(replica: ReplicaView) -> int:
    """Host memory the replica holds or has reserved (a parked one, its GPU memory too)."""
    if not _holds(replica):
        return 0
    if replica.state is ReplicaState.PARKED:
        return replica.host_bytes + replica.gpu_bytes
    return replica.host_bytes


def gpu_held(replica: ReplicaView) -> int:
    """GPU memory the replica holds or has reserved on its device (none while parked)."""
    if not _holds(replica) or replica.state is ReplicaState.PARKED:
        return 0
    return replica.gpu_bytes if replica.device.startswith("cuda") else 0


def gpu_key(device: str) -> str:
    """``"cuda"`` and ``"cuda:0"`` are the same GPU."""
    return "cuda:0" if device == "cuda" else device


def _holds(replica: ReplicaView) -> bool:
    """Whether the replica holds (or has reserved) memory."""
    return replica.state in _HOLDING
