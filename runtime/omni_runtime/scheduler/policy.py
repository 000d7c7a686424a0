"""The scheduler's decisions: plain data in, plain data out.

``SchedulerPolicy.decide(now, node, models)`` looks at a view of the node (its memory budgets)
and of every model (its replicas, their memory and load, its queue) and returns what to do:
start a replica here, stop that one, or nothing fits. It holds no processes and no event loop,
so the controller applies its decisions to real workers, the simulator replays a trace through
it, and tests drive it with a fake clock.

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

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from omni_runtime.scheduler.autoscaler import Autoscaler, ScaleTarget
from omni_sdk import Scaling
from omni_sdk.units import format_size

__all__ = [
    "Blocked",
    "Decision",
    "ModelView",
    "NodeView",
    "ParkReplica",
    "Policy",
    "ReplicaState",
    "ReplicaView",
    "SchedulerPolicy",
    "StartReplica",
    "StopReplica",
    "WakeReplica",
    "eviction_cost",
]


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    PARKED = "parked"  # its process lives; its device memory is on the host
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


_ACTIVE = (ReplicaState.STARTING, ReplicaState.READY)
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
        self.active = [r for r in self.replicas if r.state in _ACTIVE]
        self.parked = [r for r in self.replicas if r.state is ReplicaState.PARKED]


@dataclass
class NodeView:
    """The node's budgets: host memory for all replicas, each GPU's memory times overcommit."""

    host_memory: int
    gpu_budgets: dict[str, int] = field(default_factory=dict)  # "cuda:0" -> bytes


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
        plan = _Plan(node, models)

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

    def _scale_down(self, now: float, plan: _Plan, model: ModelView, target: ScaleTarget) -> None:
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
    def _parks(plan: _Plan, model: ModelView, replica: ReplicaView) -> bool:
        """Whether parking the replica is possible (a GPU one, room on the host for what it
        holds there) and cheaper than starting it again."""
        return (
            replica.device.startswith("cuda")
            and replica.gpu_bytes > 0
            and plan.host_used + replica.gpu_bytes <= plan.node.host_memory
            and model.wake_seconds < model.load_seconds
        )

    def _scale_up(self, plan: _Plan, model: ModelView, target: ScaleTarget) -> None:
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
                devices = _candidate_devices(plan.node, model, hosting, plan.gpu_used, plan.load)
            if not devices:
                return  # one replica on every GPU already
            device, victims, shortfall = self._place(model, devices, may_evict, plan, waking)
            if waking is not None and shortfall and victims is None:
                # Its GPU cannot make room (busy replicas fill it): a fresh replica elsewhere
                # serves sooner than waiting; the parked one goes when the host needs room.
                waking = None
                devices = _candidate_devices(plan.node, model, hosting, plan.gpu_used, plan.load)
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
        self, plan: _Plan, model: ModelView, replica: ReplicaView, park: bool, why: str
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
        plan: _Plan,
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
            if _fits(plan.node, need_host, need_gpu, device, host_used, plan.gpu_used):
                return device, [], ""
        shortfall = _shortfall(plan.node, need_host, need_gpu, devices[0], host_used, plan.gpu_used)
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
        plan: _Plan,
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
            if _fits(node, need_host, need_gpu, device, host_used, gpu_used):
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
        if not _fits(node, need_host, need_gpu, device, host_used, gpu_used):
            return None
        return chosen

    def _candidates(self, plan: _Plan) -> list[tuple[ModelView, ReplicaView]]:
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


class _Plan:
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
                if r.state in _ACTIVE:
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


def _shortfall(
    node: NodeView,
    need_host: int,
    need_gpu: int,
    device: str,
    host_used: int,
    gpu_used: dict[str, int],
) -> str:
    """Why one more replica does not fit on ``device`` now, or "" if it does."""
    if _fits(node, need_host, need_gpu, device, host_used, gpu_used):
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


def _fits(
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


def _candidate_devices(
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


def _holds(replica: ReplicaView) -> bool:
    """Whether the replica holds (or has reserved) memory."""
    return replica.state in _HOLDING
