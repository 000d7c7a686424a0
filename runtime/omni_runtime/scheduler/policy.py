"""The scheduler's decisions: plain data in, plain data out.

``SchedulerPolicy.decide(now, node, models)`` looks at a view of the node (its memory budgets)
and of every model (its replicas, their memory and load, its queue) and returns what to do:
start a replica here, stop that one, or nothing fits. It holds no processes and no event loop,
so the controller applies its decisions to real workers, the simulator replays a trace through
it, and tests drive it with a fake clock. What it sees is in ``views``, what it decides in
``decisions``, and the memory arithmetic of one decision in ``placement``.

Placement: a replica reserves its model's expected footprint (what it measured last time, else
its declared limit) on the host and, on a GPU, on its device. A GPU's budget is its memory
times ``gpu_overcommit``. When a replica does not fit, idle replicas of other models are
evicted cheapest first, cost being load time times expected reuse (requests over the stable
window); a replica with requests in flight, or one a model needs for ``min_replicas``, is
never evicted. If nothing can be freed, the model is blocked and its requests wait.

Memory tiers: on a GPU, an idle replica that must make room may be *parked* instead of stopped
(its process stays, its device memory moves to the host, where it counts against host memory
only) when the host has room for it and waking it (memory over PCIe) costs less than a start;
so is a GPU model's last replica when it has been idle for ``idle_timeout``. A parked replica is
woken, before any new one starts, when its model has requests again, and stopped when host
memory is short and it is the cheapest to let go.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from omni_runtime.scheduler.autoscaler import Autoscaler, ScaleTarget
from omni_runtime.scheduler.decisions import Blocked, Decision
from omni_runtime.scheduler.placement import (
    PlacementPlan,
    candidate_devices,
    fits,
    shortfall_reason,
)
from omni_runtime.scheduler.views import (
    ModelView,
    NodeView,
    ReplicaState,
    ReplicaView,
    gpu_held,
    gpu_key,
    host_held,
)

__all__ = ["Policy", "SchedulerPolicy", "eviction_cost"]


class Policy(Protocol):
    """What the controller asks of a policy (``SchedulerPolicy``, or a baseline to compare)."""

    targets: dict[str, ScaleTarget]  # each model's wanted replicas at the last decision

    def observe(self, now: float, models: Sequence[ModelView]) -> None: ...

    def decide(self, now: float, node: NodeView, models: Sequence[ModelView]) -> list[Decision]:
        """What to start, stop, park and wake now. Call ``observe`` first."""

    def last_request(self, model: str) -> float | None:
        """When ``model`` last had a request, if ever."""


def eviction_cost(model: ModelView) -> float:
    """What stopping one of its replicas costs: its load time times its expected reuse."""
    return model.load_seconds * (1.0 + model.recent_requests)


def parking_cost(model: ModelView) -> float:
    """What parking one of its replicas costs: its wake time times its expected reuse."""
    return model.wake_seconds * (1.0 + model.recent_requests)


class SchedulerPolicy:
    """Autoscaling, placement, eviction and memory tiers for every model on one node."""

    def __init__(self, stable_window: float = 60.0, panic_window: float = 6.0) -> None:
        self.stable_window = stable_window
        self.panic_window = panic_window
        self.autoscalers: dict[str, Autoscaler] = {}
        self.targets: dict[str, ScaleTarget] = {}

    def autoscaler(self, model: ModelView) -> Autoscaler:
        scaler = self.autoscalers.get(model.name)
        if scaler is None or (
            scaler.scaling is not model.scaling and scaler.scaling != model.scaling
        ):
            scaler = Autoscaler(model.scaling, self.stable_window, self.panic_window)
            if model.name in self.autoscalers:
                scaler.last_request = self.autoscalers[model.name].last_request
            self.autoscalers[model.name] = scaler
        return scaler

    def last_request(self, model: str) -> float | None:
        scaler = self.autoscalers.get(model)
        return scaler.last_request if scaler is not None else None

    def observe(self, now: float, models: Sequence[ModelView]) -> None:
        """Record each model's ongoing requests at ``now`` (call once per tick)."""
        for model in models:
            self.autoscaler(model).observe(now, model.queued + model.in_flight, model.arrived > 0)

    def decide(self, now: float, node: NodeView, models: Sequence[ModelView]) -> list[Decision]:
        """What to start, stop, park and wake now. Call ``observe`` first."""
        plan = PlacementPlan(node, models)

        # Scale down first: what it frees may make room for a start below.
        for model in models:
            target = self._target(now, model)
            self._scale_down(now, plan, model, target)

        # Then scale up, the busiest models first, making room where memory is short.
        wanting = [
            (m, self.targets[m.name])
            for m in models
            if m.serving and now >= m.not_before and self.targets[m.name].replicas > len(m.active)
        ]
        wanting.sort(key=lambda item: -(item[0].queued + item[0].in_flight))
        for model, target in wanting:
            self._scale_up(plan, model, target)
        return plan.decisions

    def _scale_down(
        self, now: float, plan: PlacementPlan, model: ModelView, target: ScaleTarget
    ) -> None:
        # A parked replica is a cache of a model that has gone quiet: it stays while the host
        # has room (it is let go, cheapest first, when host memory is needed), and goes at once
        # when the model no longer serves.
        if not model.serving:
            for replica in model.parked:
                plan.stop(model, replica, "parked replica no longer needed: not serving", "unload")
        surplus = len(model.active) - target.replicas
        if surplus <= 0:
            return
        # Replicas still starting go first (keeping the warm ones), then idle ready ones;
        # newest first either way. A replica with requests in flight is never stopped.
        starting = [r for r in model.active if r.state is ReplicaState.STARTING]
        idle_ready = [r for r in model.active if r.state is ReplicaState.READY and not r.in_flight]
        if not model.serving:
            cause = "unload"  # an operator's unload, a failed start or shutdown: not counted
        elif target.replicas <= model.scaling.min_replicas:
            cause = "idle"
        else:
            cause = "scale_down"
        by_age = sorted(starting, key=lambda r: -r.id) + sorted(idle_ready, key=lambda r: -r.id)
        leaving = by_age[:surplus]
        for replica in leaving:
            last = replica is leaving[-1] and target.replicas == 0 and model.serving
            if last and replica.state is ReplicaState.READY and self._parks(plan, model, replica):
                # Idle on a GPU: its device memory goes to the host, its process stays, and its
                # next request wakes it over PCIe instead of starting it from disk.
                plan.park(model, replica, f"idle: {target.reason}", "idle")
            else:
                plan.stop(model, replica, f"scale down: {target.reason}", cause)

    @staticmethod
    def _parks(plan: PlacementPlan, model: ModelView, replica: ReplicaView) -> bool:
        """Whether parking the replica is possible (a GPU one, room on the host for what it
        holds there) and cheaper than starting it again."""
        return (
            replica.device.startswith("cuda")
            and replica.gpu_bytes > 0
            and plan.host_used + replica.gpu_bytes <= plan.node.host_memory
            and model.wake_seconds < model.load_seconds
        )

    def _scale_up(self, plan: PlacementPlan, model: ModelView, target: ScaleTarget) -> None:
        # Only requests waiting or running may evict: a model that is merely recently used
        # waits for its next request, so two idle models never evict each other in turn.
        may_evict = model.queued + model.in_flight > 0
        hosting = {gpu_key(r.device) for r in model.active}
        parked = sorted(model.parked, key=lambda r: r.id)
        for _ in range(target.replicas - len(model.active)):
            waking = parked.pop(0) if parked else None
            if waking is not None and not may_evict:
                return  # a parked replica waits for a request: no churn while it is quiet
            if waking is not None:
                devices = [gpu_key(waking.device)]
            else:
                devices = candidate_devices(plan.node, model, hosting, plan.gpu_used, plan.load)
            if not devices:
                return  # one replica on every GPU already
            device, victims, shortfall = self._place(model, devices, may_evict, plan, waking)
            if waking is not None and shortfall and victims is None:
                # Its GPU cannot make room (busy replicas fill it): a fresh replica elsewhere
                # serves sooner than waiting; the parked one goes when the host needs room.
                waking = None
                devices = candidate_devices(plan.node, model, hosting, plan.gpu_used, plan.load)
                if not devices:
                    return
                device, victims, shortfall = self._place(model, devices, may_evict, plan, None)
            if shortfall and (not may_evict or victims is None):
                if may_evict:
                    host_short = plan.host_used + model.host_bytes > plan.node.host_memory
                    plan.decisions.append(Blocked(model.name, shortfall, host_short))
                return
            for victim_model, victim, park in victims or []:
                self._evict(plan, victim_model, victim, park, f"to make room for '{model.name}' "
                            f"({shortfall})")  # fmt: skip
            if waking is not None:
                plan.wake(model, waking, target.reason)
            else:
                plan.start(model, device, target.reason)
            hosting.add(device)

    def _evict(
        self, plan: PlacementPlan, model: ModelView, replica: ReplicaView, park: bool, why: str
    ) -> None:
        leaving = [r for r in model.active if (model.name, r.id) in plan.decided]
        if replica.state is not ReplicaState.PARKED and len(leaving) + 1 >= len(model.active):
            # Its last replica: it stays at zero until a request wants it, rather than
            # refilling the first free memory and being evicted again.
            self.autoscaler(model).evicted = True
        if park:
            plan.park(model, replica, f"parked {why}", "memory")
        else:
            plan.stop(model, replica, f"evicted {why}", "memory")

    def _last_request(self, model: ModelView) -> float:
        last = self.last_request(model.name)
        return -math.inf if last is None else last

    def _target(self, now: float, model: ModelView) -> ScaleTarget:
        if not model.serving:
            target = ScaleTarget(0, "not serving")
        else:
            target = self.autoscaler(model).target(now, len(model.active))
        self.targets[model.name] = target
        return target

    def _place(
        self,
        model: ModelView,
        devices: list[str],
        may_evict: bool,
        plan: PlacementPlan,
        waking: ReplicaView | None,
    ) -> tuple[str, list[tuple[ModelView, ReplicaView, bool]] | None, str]:
        """(device, replicas to evict there, why it did not fit as it was) for one replica.

        The first device where it fits as things are; else the one where making room is
        cheapest; victims are None when no device can be made room on. ``waking``: a parked
        replica that needs only its device memory back (it frees its host share).
        """
        need_host = 0 if waking is not None else model.host_bytes
        need_gpu = waking.gpu_bytes if waking is not None else model.gpu_bytes
        host_used = plan.host_used - (waking.gpu_bytes if waking is not None else 0)
        for device in devices:
            if fits(plan.node, need_host, need_gpu, device, host_used, plan.gpu_used):
                return device, [], ""
        shortfall = shortfall_reason(
            plan.node, need_host, need_gpu, devices[0], host_used, plan.gpu_used
        )
        if not may_evict:
            return devices[0], None, shortfall
        best: tuple[float, str, list[tuple[ModelView, ReplicaView, bool]]] | None = None
        for device in devices:
            found = self._victims(model, need_host, need_gpu, device, plan, host_used)
            if found is None:
                continue
            cost = sum(parking_cost(m) if park else eviction_cost(m) for m, _, park in found)
            if best is None or cost < best[0]:
                best = (cost, device, found)
        if best is None:
            return devices[0], None, shortfall
        return best[1], best[2], shortfall

    def _victims(
        self,
        model: ModelView,
        need_host: int,
        need_gpu: int,
        device: str,
        plan: PlacementPlan,
        host_used: int,
    ) -> list[tuple[ModelView, ReplicaView, bool]] | None:
        """The cheapest idle replicas whose parking or eviction makes room on ``device``.

        Each is (model, replica, park): parked when only GPU memory is short, the host has
        room for its memory, and waking it costs less than starting it again; else stopped.
        None when no choice of victims makes room.
        """
        node = plan.node
        gpu_used = dict(plan.gpu_used)
        taken: dict[str, int] = {}  # idle replicas chosen here, by model
        chosen: list[tuple[ModelView, ReplicaView, bool]] = []
        for other, replica in self._candidates(plan):
            if fits(node, need_host, need_gpu, device, host_used, gpu_used):
                break
            if other.name == model.name or (other.name, replica.id) in plan.decided:
                continue
            parked = replica.state is ReplicaState.PARKED
            if not parked:
                # Never below min_replicas, counting what this decision already took.
                keep = other.scaling.min_replicas if other.serving else 0
                gone = sum(1 for r in other.active if (other.name, r.id) in plan.decided)
                if len(other.active) - gone - taken.get(other.name, 0) <= keep:
                    continue
            frees_gpu = (
                not parked
                and device.startswith("cuda")
                and gpu_key(replica.device) == gpu_key(device)
                and replica.gpu_bytes > 0
            )
            host_short = host_used + need_host > node.host_memory
            if not host_short and not frees_gpu:
                continue  # evicting it would not help
            park = (
                frees_gpu
                and not host_short
                and host_used + replica.gpu_bytes + need_host <= node.host_memory
                and other.wake_seconds < other.load_seconds
            )
            chosen.append((other, replica, park))
            if not parked:
                taken[other.name] = taken.get(other.name, 0) + 1
            if park:
                host_used += replica.gpu_bytes
            else:
                host_used -= host_held(replica)
            gpu_used[gpu_key(replica.device)] = gpu_used.get(gpu_key(replica.device), 0) - gpu_held(
                replica
            )
        if not fits(node, need_host, need_gpu, device, host_used, gpu_used):
            return None
        return chosen

    def _candidates(self, plan: PlacementPlan) -> list[tuple[ModelView, ReplicaView]]:
        """Every replica that may be evicted, cheapest first; sorted once per decision.

        Idle ready replicas of models with nothing queued (newest first within a model) and
        parked ones. Equal costs (same load time, as many recent requests): the least recently
        used goes first.
        """
        if plan.candidates is None:
            found: list[tuple[tuple[float, float, int, int], ModelView, ReplicaView]] = []
            for other in plan.models.values():
                if other.queued:
                    continue
                cost, last = eviction_cost(other), self._last_request(other)
                for r in other.active:
                    if r.state is ReplicaState.READY and not r.in_flight:
                        found.append(((cost, last, -r.host_bytes, -r.id), other, r))
                for r in other.parked:  # they hold host memory only
                    found.append(((cost, last, -r.host_bytes, -r.id), other, r))
            found.sort(key=lambda c: c[0])
            plan.candidates = [(m, r) for _, m, r in found]
        return plan.candidates
