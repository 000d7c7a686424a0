"""Placement arithmetic for one ``decide``: the memory its decisions leave on the host and on
each GPU, whether one more replica fits on a device (and if not, why), and where it may go."""

from __future__ import annotations

from collections.abc import Sequence

from omni_runtime.scheduler.decisions import (
    Decision,
    ParkReplica,
    StartReplica,
    StopReplica,
    WakeReplica,
)
from omni_runtime.scheduler.views import (
    ACTIVE,
    ModelView,
    NodeView,
    ReplicaView,
    gpu_held,
    gpu_key,
    host_held,
)
from omni_sdk.units import format_size

__all__ = ["PlacementPlan", "candidate_devices", "fits", "shortfall_reason"]


class PlacementPlan:
    """The decisions of one ``decide`` so far, and the memory they leave."""

    def __init__(self, node: NodeView, models: Sequence[ModelView]) -> None:
        self.node = node
        self.models = {m.name: m for m in models}
        self.decisions: list[Decision] = []
        # Replicas this decision already stops, parks or wakes: none is chosen twice.
        self.decided: set[tuple[str, int]] = set()
        self.candidates: list[tuple[ModelView, ReplicaView]] | None = None  # for eviction
        self.host_used = 0
        self.gpu_used: dict[str, int] = {}
        self.load: dict[str, int] = {}  # requests in flight per GPU
        for m in models:
            for r in m.replicas:
                self.host_used += host_held(r)
                if r.device == "cpu":
                    continue
                gpu = gpu_held(r)
                key = gpu_key(r.device)
                if gpu:
                    self.gpu_used[key] = self.gpu_used.get(key, 0) + gpu
                if r.state in ACTIVE:
                    self.load[key] = self.load.get(key, 0) + r.in_flight

    def _free(self, replica: ReplicaView) -> None:
        self.host_used -= host_held(replica)
        key = gpu_key(replica.device)
        if gpu_held(replica):
            self.gpu_used[key] -= gpu_held(replica)

    def stop(self, model: ModelView, replica: ReplicaView, reason: str, cause: str) -> None:
        self.decisions.append(StopReplica(model.name, replica.id, reason, cause))
        self.decided.add((model.name, replica.id))
        self._free(replica)

    def park(self, model: ModelView, replica: ReplicaView, reason: str, cause: str) -> None:
        self.decisions.append(ParkReplica(model.name, replica.id, reason, cause))
        self.decided.add((model.name, replica.id))
        self._free(replica)
        self.host_used += replica.host_bytes + replica.gpu_bytes

    def wake(self, model: ModelView, replica: ReplicaView, reason: str) -> None:
        self.decisions.append(WakeReplica(model.name, replica.id, reason))
        self.decided.add((model.name, replica.id))
        self.host_used -= replica.gpu_bytes
        key = gpu_key(replica.device)
        self.gpu_used[key] = self.gpu_used.get(key, 0) + replica.gpu_bytes

    def start(self, model: ModelView, device: str, reason: str) -> None:
        self.decisions.append(StartReplica(model.name, device, reason))
        self.host_used += model.host_bytes
        if device.startswith("cuda"):
            self.gpu_used[device] = self.gpu_used.get(device, 0) + model.gpu_bytes


def shortfall_reason(
    node: NodeView,
    need_host: int,
    need_gpu: int,
    device: str,
    host_used: int,
    gpu_used: dict[str, int],
) -> str:
    """Why one more replica does not fit on ``device`` now, or "" if it does."""
    if fits(node, need_host, need_gpu, device, host_used, gpu_used):
        return ""
    if host_used + need_host > node.host_memory:
        return (
            f"a replica needs {format_size(need_host)} of host memory and "
            f"{format_size(max(0, node.host_memory - host_used))} of "
            f"{format_size(node.host_memory)} (scheduler.host_memory) is free"
        )
    key = gpu_key(device)
    budget = node.gpu_budgets.get(key, 0)
    return (
        f"a replica needs {format_size(need_gpu)} on {key} and "
        f"{format_size(max(0, budget - gpu_used.get(key, 0)))} of its "
        f"{format_size(budget)} budget (memory × scheduler.gpu_overcommit) is free"
    )


def fits(
    node: NodeView,
    need_host: int,
    need_gpu: int,
    device: str,
    host_used: int,
    gpu_used: dict[str, int],
) -> bool:
    if host_used + need_host > node.host_memory:
        return False
    if device.startswith("cuda") and need_gpu:
        key = gpu_key(device)
        budget = node.gpu_budgets.get(key)
        return budget is None or gpu_used.get(key, 0) + need_gpu <= budget
    return True


def candidate_devices(
    node: NodeView,
    model: ModelView,
    hosting: set[str],
    gpu_used: dict[str, int],
    gpu_load: dict[str, int],
) -> list[str]:
    """Where a new replica may go, best first.

    A model on the CPU or pinned to one GPU ("cuda:N") has one choice. One on "cuda" may go on
    any GPU of the node that does not hold a replica of it yet: the least busy first, then the
    one with the most free budget.
    """
    if not model.device.startswith("cuda"):
        return [model.device]
    if model.device != "cuda" or len(node.gpu_budgets) <= 1:
        return [gpu_key(model.device)]
    free = [d for d in node.gpu_budgets if d not in hosting]
    return sorted(
        free, key=lambda d: (gpu_load.get(d, 0), gpu_used.get(d, 0) - node.gpu_budgets[d], d)
    )
