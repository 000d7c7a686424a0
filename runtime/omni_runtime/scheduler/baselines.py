"""Naive policies to compare the scheduler's own against, on the same controller.

- ``LruPolicy``: one replica per model, started on its first request and kept; when memory is
  short, the least recently used idle replicas are stopped to make room.
- ``StaticPolicy``: models placed once, first fit by decreasing size, and never moved; with
  ``dedicated``, model *i* alone on GPU *i* (the one-model-per-GPU baseline).

They decide through the same ``Policy`` interface as ``SchedulerPolicy``, so the controller,
the queues and the simulated physics are the same for all three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from omni_runtime.scheduler.autoscaler import ScaleTarget
from omni_runtime.scheduler.decisions import Blocked, Decision, StartReplica, StopReplica
from omni_runtime.scheduler.views import (
    ModelView,
    NodeView,
    ReplicaState,
    ReplicaView,
    gpu_held,
    gpu_key,
    host_held,
)

__all__ = ["LruPolicy", "StaticPolicy"]


def _devices(node: NodeView, model: ModelView) -> list[str]:
    if model.device.startswith("cuda") and node.gpu_budgets:
        return sorted(node.gpu_budgets)
    return [model.device]


class _Usage:
    """Memory held per device, and what a replica of a model needs there."""

    def __init__(self, node: NodeView, models: Sequence[ModelView]) -> None:
        self.node = node
        self.host = sum(host_held(r) for m in models for r in m.replicas)
        self.gpu: dict[str, int] = {}
        for m in models:
            for r in m.replicas:
                if gpu_held(r):
                    key = gpu_key(r.device)
                    self.gpu[key] = self.gpu.get(key, 0) + gpu_held(r)

    def free(self, device: str) -> int:
        if device.startswith("cuda"):
            return self.node.gpu_budgets.get(device, 0) - self.gpu.get(device, 0)
        return self.node.host_memory - self.host

    @staticmethod
    def need(model: ModelView, device: str) -> int:
        return model.gpu_bytes if device.startswith("cuda") else model.host_bytes

    def add(self, model: ModelView, device: str) -> None:
        if device.startswith("cuda"):
            self.gpu[device] = self.gpu.get(device, 0) + model.gpu_bytes
        else:
            self.host += model.host_bytes

    def release(self, replica: ReplicaView) -> None:
        """What a stopped replica held is free again."""
        self.host -= host_held(replica)
        if gpu_held(replica):
            key = gpu_key(replica.device)
            self.gpu[key] = self.gpu.get(key, 0) - gpu_held(replica)


class LruPolicy:
    """One replica per model, on demand; the least recently used idle one makes room."""

    def __init__(self) -> None:
        self.targets: dict[str, ScaleTarget] = {}
        self._last: dict[str, float] = {}

    def last_request(self, model: str) -> float | None:
        return self._last.get(model)

    def observe(self, now: float, models: Sequence[ModelView]) -> None:
        for m in models:
            if m.arrived or m.queued or m.in_flight:
                self._last[m.name] = now

    def decide(self, now: float, node: NodeView, models: Sequence[ModelView]) -> list[Decision]:
        usage = _Usage(node, models)
        decisions: list[Decision] = []
        stopped: set[tuple[str, int]] = set()
        for m in models:
            self.targets[m.name] = ScaleTarget(1 if (m.active or m.queued) else 0, "lru")
        waiting = [m for m in models if m.queued and not m.active and now >= m.not_before]
        waiting.sort(key=lambda m: self._last.get(m.name, math.inf))
        for model in waiting:
            devices = _devices(node, model)
            device = max(devices, key=usage.free)
            need = usage.need(model, device)
            if usage.free(device) < need:
                idle = sorted(
                    (
                        (self._last.get(m.name, -math.inf), m, r)
                        for m in models
                        for r in m.active
                        if r.state is ReplicaState.READY
                        and not r.in_flight
                        and not m.queued
                        and (m.name, r.id) not in stopped
                    ),
                    key=lambda item: item[0],
                )
                for device in devices:
                    victims = []
                    room = usage.free(device)
                    for _, m, r in idle:
                        if room >= need:
                            break
                        if not device.startswith("cuda"):
                            victims.append((m, r))
                            room += host_held(r)
                        elif gpu_key(r.device) == device:
                            victims.append((m, r))
                            room += gpu_held(r)
                    if room >= need:
                        break
                else:
                    host = not model.device.startswith("cuda")
                    decisions.append(Blocked(model.name, "no device can make room", host))
                    continue
                for m, r in victims:
                    decisions.append(StopReplica(m.name, r.id, "least recently used", "memory"))
                    stopped.add((m.name, r.id))
                    usage.release(r)
            decisions.append(StartReplica(model.name, device, "a request waits"))
            usage.add(model, device)
        return decisions


class StaticPolicy:
    """Models placed at the first decision and never moved; what does not fit never runs."""

    def __init__(self, dedicated: bool = False) -> None:
        self.dedicated = dedicated
        self.targets: dict[str, ScaleTarget] = {}
        self._placed = False

    def last_request(self, model: str) -> float | None:
        return None

    def observe(self, now: float, models: Sequence[ModelView]) -> None:
        return None

    def decide(self, now: float, node: NodeView, models: Sequence[ModelView]) -> list[Decision]:
        if self._placed:
            return []
        self._placed = True
        decisions: list[Decision] = []
        usage = _Usage(node, models)
        if self.dedicated:  # model i alone on GPU i (or each alone, on a CPU node)
            gpus = sorted(node.gpu_budgets)
            for i, model in enumerate(models):
                device = gpus[i] if model.device.startswith("cuda") and i < len(gpus) else "cpu"
                decisions.append(StartReplica(model.name, device, "dedicated"))
                self.targets[model.name] = ScaleTarget(1, "dedicated")
            return decisions
        for model in sorted(models, key=lambda m: (-(m.gpu_bytes or m.host_bytes), m.name)):
            self.targets[model.name] = ScaleTarget(0, "does not fit")
            for device in _devices(node, model):
                if usage.free(device) >= usage.need(model, device):
                    usage.add(model, device)
                    decisions.append(StartReplica(model.name, device, "placed at start"))
                    self.targets[model.name] = ScaleTarget(1, "placed at start")
                    break
        return decisions
