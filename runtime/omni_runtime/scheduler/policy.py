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
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

from omni_runtime.scheduler.autoscaler import Autoscaler, ScaleTarget
from omni_sdk import Scaling
from omni_sdk._units import format_size

__all__ = [
    "Blocked",
    "Decision",
    "ModelView",
    "NodeView",
    "ReplicaState",
    "ReplicaView",
    "SchedulerPolicy",
    "StartReplica",
    "StopReplica",
    "eviction_cost",
]


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class ReplicaView:
    """One replica as the policy sees it."""

    id: int
    state: ReplicaState
    in_flight: int = 0
    host_bytes: int = 0  # reserved while starting, measured once ready
    gpu_bytes: int = 0
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
    recent_requests: float = 0.0  # requests over the stable window: its expected reuse
    serving: bool = True  # False when unloaded by an operator or failed to load
    not_before: float = 0.0  # no new replica before this (backoff after crashes)
    replicas: list[ReplicaView] = field(default_factory=list)

    @functools.cached_property
    def active(self) -> list[ReplicaView]:
        """Replicas that count towards its size: starting or ready (read once per decision)."""
        return [r for r in self.replicas if r.state in (ReplicaState.STARTING, ReplicaState.READY)]


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
class Blocked:
    """The model needs a replica and none fits, even after every possible eviction."""

    model: str
    reason: str


Decision = StartReplica | StopReplica | Blocked


def eviction_cost(model: ModelView) -> float:
    """What evicting one of its replicas costs: its load time times its expected reuse."""
    return model.load_seconds * (1.0 + model.recent_requests)


def gpu_key(device: str) -> str:
    """``"cuda"`` and ``"cuda:0"`` are the same GPU."""
    return "cuda:0" if device == "cuda" else device


class SchedulerPolicy:
    """Autoscaling, placement and eviction for every model on one node."""

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

    def observe(self, now: float, models: list[ModelView]) -> None:
        """Record each model's ongoing requests at ``now`` (call once per tick)."""
        for model in models:
            self.autoscaler(model).observe(now, model.queued + model.in_flight, model.arrived > 0)

    def decide(self, now: float, node: NodeView, models: list[ModelView]) -> list[Decision]:
        """What to start and stop now. Call ``observe`` first."""
        decisions: list[Decision] = []
        by_name = {m.name: m for m in models}
        host_used = sum(r.host_bytes for m in models for r in m.replicas if _holds(r))
        gpu_used: dict[str, int] = {}
        for m in models:
            for r in m.replicas:
                if _holds(r) and r.device.startswith("cuda"):
                    gpu_used[gpu_key(r.device)] = gpu_used.get(gpu_key(r.device), 0) + r.gpu_bytes
        stopping: set[tuple[str, int]] = set()

        # Scale down first: what it frees may make room for a start below.
        for model in models:
            target = self._target(now, model)
            surplus = len(model.active) - target.replicas
            if surplus <= 0:
                continue
            # Replicas still starting go first (keeping the warm ones), then idle ready ones;
            # newest first either way. A replica with requests in flight is never stopped.
            starting = [r for r in model.active if r.state is ReplicaState.STARTING]
            idle = [r for r in model.active if r.state is ReplicaState.READY and not r.in_flight]
            if not model.serving:
                cause = "unload"  # an operator's unload, a failed start or shutdown: not counted
            elif target.replicas <= model.scaling.min_replicas:
                cause = "idle"
            else:
                cause = "scale_down"
            by_age = sorted(starting, key=lambda r: -r.id) + sorted(idle, key=lambda r: -r.id)
            for replica in by_age[:surplus]:
                decisions.append(
                    StopReplica(model.name, replica.id, f"scale down: {target.reason}", cause)
                )
                stopping.add((model.name, replica.id))
                host_used -= replica.host_bytes
                if replica.device.startswith("cuda"):
                    gpu_used[gpu_key(replica.device)] -= replica.gpu_bytes

        # Then scale up, the busiest models first, evicting idle replicas where memory is short.
        wanting = [
            (m, self.targets[m.name])
            for m in models
            if m.serving and now >= m.not_before and self.targets[m.name].replicas > len(m.active)
        ]
        wanting.sort(key=lambda item: -(item[0].queued + item[0].in_flight))
        gpu_load: dict[str, int] = {}
        for m in models:
            for r in m.active:
                if r.device.startswith("cuda"):
                    key = gpu_key(r.device)
                    gpu_load[key] = gpu_load.get(key, 0) + r.in_flight
        for model, target in wanting:
            # Only requests waiting or running may evict: a model that is merely recently used
            # waits for its next request, so two idle models never evict each other in turn.
            may_evict = model.queued + model.in_flight > 0
            hosting = {gpu_key(r.device) for r in model.active}
            for _ in range(target.replicas - len(model.active)):
                devices = _candidate_devices(node, model, hosting, gpu_used, gpu_load)
                if not devices:
                    break  # one replica on every GPU already
                device, victims, shortfall = self._place(
                    model, devices, may_evict, by_name, stopping, node, host_used, gpu_used
                )
                if shortfall and (not may_evict or victims is None):
                    if may_evict:
                        decisions.append(Blocked(model.name, shortfall))
                    break
                if victims:
                    for victim_model, victim in victims:
                        leaving = [
                            r for r in victim_model.active if (victim_model.name, r.id) in stopping
                        ]
                        if len(leaving) + 1 >= len(victim_model.active):
                            # Its last replica: it stays at zero until a request wants it,
                            # rather than refilling the first free memory and being evicted again.
                            self.autoscaler(victim_model).evicted = True
                        decisions.append(
                            StopReplica(
                                victim_model.name,
                                victim.id,
                                f"evicted to make room for '{model.name}' ({shortfall})",
                                "memory",
                            )
                        )
                        stopping.add((victim_model.name, victim.id))
                        host_used -= victim.host_bytes
                        if victim.device.startswith("cuda"):
                            gpu_used[gpu_key(victim.device)] -= victim.gpu_bytes
                decisions.append(StartReplica(model.name, device, target.reason))
                host_used += model.host_bytes
                if device.startswith("cuda"):
                    gpu_used[device] = gpu_used.get(device, 0) + model.gpu_bytes
                    hosting.add(device)
        return decisions

    def _last_request(self, model: ModelView) -> float:
        scaler = self.autoscalers.get(model.name)
        last = scaler.last_request if scaler is not None else None
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
        by_name: dict[str, ModelView],
        stopping: set[tuple[str, int]],
        node: NodeView,
        host_used: int,
        gpu_used: dict[str, int],
    ) -> tuple[str, list[tuple[ModelView, ReplicaView]] | None, str]:
        """(device, replicas to evict there, why it did not fit as it was) for one replica.

        The first device where it fits as things are; else the one where making room is
        cheapest; victims are None when no device can be made room on.
        """
        for device in devices:
            if _fits(node, model, device, host_used, gpu_used):
                return device, [], ""
        shortfall = self._shortfall(node, model, devices[0], host_used, gpu_used)
        if not may_evict:
            return devices[0], None, shortfall
        best: tuple[float, str, list[tuple[ModelView, ReplicaView]]] | None = None
        for device in devices:
            found = self._victims(model, device, by_name, stopping, node, host_used, gpu_used)
            if found is None:
                continue
            cost = sum(eviction_cost(m) for m, _ in found)
            if best is None or cost < best[0]:
                best = (cost, device, found)
        if best is None:
            return devices[0], None, shortfall
        return best[1], best[2], shortfall

    def _shortfall(
        self,
        node: NodeView,
        model: ModelView,
        device: str,
        host_used: int,
        gpu_used: dict[str, int],
    ) -> str:
        """Why one more replica of ``model`` does not fit on ``device`` now, or "" if it does."""
        if _fits(node, model, device, host_used, gpu_used):
            return ""
        if host_used + model.host_bytes > node.host_memory:
            return (
                f"a replica needs {format_size(model.host_bytes)} of host memory and "
                f"{format_size(max(0, node.host_memory - host_used))} of "
                f"{format_size(node.host_memory)} (scheduler.host_memory) is free"
            )
        if device.startswith("cuda") and model.gpu_bytes:
            key = gpu_key(device)
            budget = node.gpu_budgets.get(key)
            if budget is not None and gpu_used.get(key, 0) + model.gpu_bytes > budget:
                return (
                    f"a replica needs {format_size(model.gpu_bytes)} on {key} and "
                    f"{format_size(max(0, budget - gpu_used.get(key, 0)))} of its "
                    f"{format_size(budget)} budget (memory × scheduler.gpu_overcommit) is free"
                )
        return ""

    def _victims(
        self,
        model: ModelView,
        device: str,
        by_name: dict[str, ModelView],
        stopping: set[tuple[str, int]],
        node: NodeView,
        host_used: int,
        gpu_used: dict[str, int],
    ) -> list[tuple[ModelView, ReplicaView]] | None:
        """The cheapest idle replicas whose eviction makes room on ``device``, else None."""
        candidates: list[tuple[float, ModelView, ReplicaView]] = []
        for other in by_name.values():
            if other.name == model.name or other.queued:
                continue
            keep = other.scaling.min_replicas if other.serving else 0
            leaving = sum(1 for r in other.active if (other.name, r.id) in stopping)
            removable = len(other.active) - leaving - keep
            idle = [
                r
                for r in other.active
                if r.state is ReplicaState.READY
                and not r.in_flight
                and (other.name, r.id) not in stopping
            ]
            for replica in sorted(idle, key=lambda r: -r.id)[: max(0, removable)]:
                candidates.append((eviction_cost(other), other, replica))
        # Equal costs (same load time, as many recent requests): the least recently used goes.
        candidates.sort(key=lambda c: (c[0], self._last_request(c[1]), -c[2].host_bytes))
        chosen: list[tuple[ModelView, ReplicaView]] = []
        gpu_used = dict(gpu_used)
        for _, other, replica in candidates:
            if _fits(node, model, device, host_used, gpu_used):
                break
            frees_gpu = (
                device.startswith("cuda")
                and gpu_key(replica.device) == gpu_key(device)
                and replica.gpu_bytes > 0
            )
            host_short = host_used + model.host_bytes > node.host_memory
            if not host_short and not frees_gpu:
                continue  # evicting it would not help
            chosen.append((other, replica))
            host_used -= replica.host_bytes
            if replica.device.startswith("cuda"):
                gpu_used[gpu_key(replica.device)] -= replica.gpu_bytes
        if not _fits(node, model, device, host_used, gpu_used):
            return None
        return chosen


def _fits(
    node: NodeView, model: ModelView, device: str, host_used: int, gpu_used: dict[str, int]
) -> bool:
    if host_used + model.host_bytes > node.host_memory:
        return False
    if device.startswith("cuda") and model.gpu_bytes:
        key = gpu_key(device)
        budget = node.gpu_budgets.get(key)
        return budget is None or gpu_used.get(key, 0) + model.gpu_bytes <= budget
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
    return replica.state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)
