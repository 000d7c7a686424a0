"""``omni-runtime simulate``: replay a request trace through the scheduler's policy.

The clock and the GPUs are simulated; the decisions are the runtime's own
(``SchedulerPolicy``: autoscaling, placement, eviction by cost). The physics are fixed so that
results compare across versions:

- a GPU has ``gpu_memory`` and runs up to ``max_batch`` requests at once, each taking its
  ``duration``; requests queue per model and a freed slot goes to the oldest waiting request
  among the models resident on that GPU;
- a model serves only while resident in a GPU's memory; making it resident takes
  memory / ``pcie_gbps`` when the node holds it in host memory (it was loaded before) and
  memory / ``disk_gbps`` the first time (GB = 10^9 bytes); host memory is not limited;
- a request meets the SLO when it starts within ``slo`` seconds of its arrival.

Policies: ``omni`` (the scheduler's policy, replicas on any GPU), ``lru`` (one replica per
model, loaded on demand, the least recently used idle model evicted when memory is short) and
``static`` (models packed onto GPUs at the start, first fit by decreasing size, never moved:
the baseline puts each model alone on a GPU of its own).
"""

from __future__ import annotations

import csv
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_runtime.scheduler.policy import (
    Blocked,
    Decision,
    ModelView,
    NodeView,
    ReplicaState,
    ReplicaView,
    SchedulerPolicy,
    StartReplica,
    StopReplica,
)
from omni_sdk import Scaling
from omni_sdk._units import format_size, parse_duration, parse_size

__all__ = [
    "POLICIES",
    "SimulationOptions",
    "SimulationResult",
    "TraceError",
    "TraceRequest",
    "plan",
    "read_trace",
    "simulate",
]

POLICIES = ("omni", "lru", "static")
TICK = 1.0  # simulated seconds between policy runs (a request for a cold model runs it at once)
_GB = 1e9
_HOST_MEMORY = 1 << 62  # the simulated node's host memory is not a limit
_FOREVER = 1e12
_MOST_GPUS = 1024  # the search gives up beyond this many GPUs


class TraceError(Exception):
    """A trace or an option is wrong; the message names the file, line and column, or option."""


@dataclass(frozen=True)
class TraceRequest:
    time: float
    model: str
    duration: float
    memory: int


@dataclass(frozen=True)
class SimulationOptions:
    gpu_memory: int = 80 << 30
    max_batch: int = 16
    pcie_gbps: float = 25.0
    disk_gbps: float = 2.0
    slo: float = 2.0
    target: float = 0.99
    gpus: int | None = None
    policy: str = "omni"

    def check(self) -> None:
        """Raise ``TraceError`` naming the first option out of range."""
        problems = [
            ("--gpu-memory", self.gpu_memory > 0, "a size above 0, e.g. 80GiB"),
            ("--max-batch", self.max_batch >= 1, "at least 1"),
            ("--pcie-gbps", self.pcie_gbps > 0, "above 0"),
            ("--disk-gbps", self.disk_gbps > 0, "above 0"),
            ("--slo", self.slo > 0, "a duration above 0, e.g. 2s"),
            ("--target", 0 < self.target <= 1, "a fraction in (0, 1], e.g. 0.99"),
            ("--gpus", self.gpus is None or self.gpus >= 1, "at least 1"),
            ("--policy", self.policy in POLICIES, "one of " + ", ".join(POLICIES)),
        ]
        for option, ok, allowed in problems:
            if not ok:
                value = getattr(self, option[2:].replace("-", "_"))
                raise TraceError(f"{option} must be {allowed}; got {value!r}")


@dataclass
class SimulationResult:
    gpus: int
    policy: str
    waits: list[float]  # per request, seconds from arrival to start; inf if it never started
    slo: float
    cold_starts: int = 0
    evictions: int = 0

    @property
    def requests(self) -> int:
        return len(self.waits)

    @property
    def slo_attainment(self) -> float:
        if not self.waits:
            return 1.0
        return sum(1 for w in self.waits if w <= self.slo + 1e-9) / len(self.waits)

    @property
    def p99_wait(self) -> float:
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# -- the trace ---------------------------------------------------------------------------

_COLUMNS = ("time", "model", "duration", "memory")


def read_trace(path: Path) -> list[TraceRequest]:
    """Parse a trace CSV; a bad row raises ``TraceError`` naming the file, line and column."""
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    requests = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TraceError(f"{path}: empty; expected a header: {','.join(_COLUMNS)}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:1: not CSV: {exc}") from None
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise TraceError(
                f"{path}:1: the header lacks column {', '.join(missing)} "
                f"(expected {','.join(_COLUMNS)}; got {','.join(header)})"
            )
        index = {c: header.index(c) for c in _COLUMNS}
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                requests.append(_parse_row(path, reader.line_num, row, index))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:{reader.line_num}: not CSV: {exc}") from None
    requests.sort(key=lambda r: r.time)
    return requests


def _parse_row(path: Path, line: int, row: list[str], index: dict[str, int]) -> TraceRequest:
    def cell(column: str) -> str:
        position = index[column]
        if position >= len(row):
            raise TraceError(f"{path}:{line}: column '{column}' is missing")
        return row[position].strip()

    def number(column: str, minimum: float, strict: bool) -> float:
        text = cell(column)
        try:
            value = float(text)
        except ValueError:
            raise TraceError(
                f"{path}:{line}: column '{column}': expected seconds, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
            raise TraceError(f"{path}:{line}: column '{column}': must be {bound}, got {text!r}")
        return value

    time = number("time", 0.0, strict=False)
    model = cell("model")
    if not model:
        raise TraceError(f"{path}:{line}: column 'model' is empty")
    duration = number("duration", 0.0, strict=True)
    text = cell("memory")
    try:
        memory = parse_size(text)
    except ValueError as exc:
        raise TraceError(f"{path}:{line}: column 'memory': {exc}") from None
    if memory <= 0:
        raise TraceError(f"{path}:{line}: column 'memory': must be above 0, got {text!r}")
    return TraceRequest(time=time, model=model, duration=duration, memory=memory)


def model_sizes(trace: list[TraceRequest], options: SimulationOptions) -> dict[str, int]:
    """Each model's footprint (its largest ``memory``); one too big for a GPU is an error."""
    sizes: dict[str, int] = {}
    for request in trace:
        sizes[request.model] = max(sizes.get(request.model, 0), request.memory)
    for name, size in sizes.items():
        if size > options.gpu_memory:
            raise TraceError(
                f"model '{name}' needs {format_size(size)}, more than --gpu-memory "
                f"{format_size(options.gpu_memory)}: it could never be resident"
            )
    return sizes


# -- the simulation ----------------------------------------------------------------------


@dataclass
class _Replica:
    id: int
    model: _Model
    device: str
    state: ReplicaState = ReplicaState.STARTING
    in_flight: int = 0


@dataclass
class _Model:
    name: str
    memory: int
    queue: deque[int] = field(default_factory=deque)  # indexes into the trace
    replicas: list[_Replica] = field(default_factory=list)
    in_flight: int = 0
    arrived: int = 0
    in_host_memory: bool = False  # loaded once already: the next load comes over PCIe
    last_used: float = -math.inf
    arrivals: deque[float] = field(default_factory=deque)


class _Simulation:
    def __init__(
        self, trace: list[TraceRequest], options: SimulationOptions, gpus: int, policy: str
    ) -> None:
        self.trace = trace
        self.options = options
        self.gpus = {f"cuda:{i}": 0 for i in range(gpus)}  # device -> requests running
        self.policy_name = policy
        sizes = model_sizes(trace, options)
        self.models = {name: _Model(name, size) for name, size in sizes.items()}
        self.waits = [math.inf] * len(trace)
        self.events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.cold_starts = 0
        self.evictions = 0
        self._next_id = 0
        self.policy = SchedulerPolicy()
        self.scaling = Scaling(
            min_replicas=0,
            max_replicas=max(1, gpus),
            target_ongoing_requests=options.max_batch,
            idle_timeout=_FOREVER,
            max_queue_size=1 << 30,
        )
        self.node = NodeView(_HOST_MEMORY, {d: options.gpu_memory for d in self.gpus})

    # event kinds, in the order ties are handled
    _READY, _DONE, _ARRIVAL, _TICK = range(4)

    def push(self, time: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (time, kind, self._seq, payload))

    def run(self) -> SimulationResult:
        for index, request in enumerate(self.trace):
            self.push(request.time, self._ARRIVAL, index)
        if self.policy_name in ("static", "dedicated"):
            self._place_static()
        elif self.trace:
            self.push(self.trace[0].time, self._TICK, None)
        pending = len(self.trace)
        while self.events:
            now, kind, _, payload = heapq.heappop(self.events)
            if kind == self._ARRIVAL:
                model = self.models[self.trace[payload].model]
                model.queue.append(payload)
                model.arrived += 1
                model.arrivals.append(now)
                if self._dispatch_model(model, now):
                    pass
                elif not any(r.state is ReplicaState.READY for r in model.replicas):
                    self._decide(now)  # a cold model: like the runtime's wake-up
            elif kind == self._DONE:
                replica = payload
                replica.in_flight -= 1
                replica.model.in_flight -= 1
                self.gpus[replica.device] -= 1
                pending -= 1
                self._dispatch_gpu(replica.device, now)
            elif kind == self._READY:
                replica = payload
                if replica.state is ReplicaState.STARTING:  # not stopped while it loaded
                    replica.state = ReplicaState.READY
                    replica.model.in_host_memory = True
                    self._dispatch_gpu(replica.device, now)
            elif kind == self._TICK:
                self._decide(now)
                if pending and (len(self.events) > 0 or self._waiting()):
                    self.push(now + TICK, self._TICK, None)
        return SimulationResult(
            gpus=len(self.gpus),
            policy=self.policy_name,
            waits=self.waits,
            slo=self.options.slo,
            cold_starts=self.cold_starts,
            evictions=self.evictions,
        )

    def _waiting(self) -> bool:
        return any(m.queue for m in self.models.values())

    # -- serving -------------------------------------------------------------------------

    def _start(self, replica: _Replica, index: int, now: float) -> None:
        model = replica.model
        model.queue.popleft()
        model.in_flight += 1
        model.last_used = now
        replica.in_flight += 1
        self.gpus[replica.device] += 1
        self.waits[index] = now - self.trace[index].time
        self.push(now + self.trace[index].duration, self._DONE, replica)

    def _dispatch_model(self, model: _Model, now: float) -> bool:
        """Start the model's waiting requests on its ready replicas with a free slot."""
        started = False
        while model.queue:
            free = [
                r
                for r in model.replicas
                if r.state is ReplicaState.READY and self.gpus[r.device] < self.options.max_batch
            ]
            if not free:
                break
            replica = min(free, key=lambda r: self.gpus[r.device])
            self._start(replica, model.queue[0], now)
            started = True
        return started

    def _dispatch_gpu(self, device: str, now: float) -> None:
        """Give the GPU's free slots to the oldest requests of the models resident on it."""
        resident = [
            r
            for m in self.models.values()
            for r in m.replicas
            if r.device == device and r.state is ReplicaState.READY and m.queue
        ]
        while resident and self.gpus[device] < self.options.max_batch:
            replica = min(resident, key=lambda r: self.trace[r.model.queue[0]].time)
            self._start(replica, replica.model.queue[0], now)
            if not replica.model.queue:
                resident.remove(replica)

    # -- decisions -----------------------------------------------------------------------

    def _decide(self, now: float) -> None:
        if self.policy_name in ("static", "dedicated"):
            return
        if self.policy_name == "lru":
            decisions = self._decide_lru(now)
        else:
            views = [self._view(m, now) for m in self.models.values()]
            self.policy.observe(now, views)
            decisions = self.policy.decide(now, self.node, views)
        for decision in decisions:
            if isinstance(decision, StartReplica):
                self._start_replica(self.models[decision.model], decision.device, now)
            elif isinstance(decision, StopReplica):
                self._stop_replica(self.models[decision.model], decision.replica, decision.cause)

    def _view(self, model: _Model, now: float) -> ModelView:
        arrived, model.arrived = model.arrived, 0
        while model.arrivals and model.arrivals[0] < now - self.policy.stable_window:
            model.arrivals.popleft()
        return ModelView(
            name=model.name,
            scaling=self.scaling,
            host_bytes=0,
            gpu_bytes=model.memory,
            device="cuda",
            queued=len(model.queue),
            in_flight=model.in_flight,
            arrived=arrived,
            load_seconds=model.memory / (self.options.pcie_gbps * _GB),
            recent_requests=float(len(model.arrivals)),
            replicas=[
                ReplicaView(r.id, r.state, r.in_flight, 0, model.memory, r.device)
                for r in model.replicas
            ],
        )

    def _start_replica(self, model: _Model, device: str, now: float) -> None:
        self._next_id += 1
        replica = _Replica(self._next_id, model, device)
        model.replicas.append(replica)
        speed = self.options.pcie_gbps if model.in_host_memory else self.options.disk_gbps
        self.cold_starts += 1
        self.push(now + model.memory / (speed * _GB), self._READY, replica)

    def _stop_replica(self, model: _Model, replica_id: int, cause: str) -> None:
        for replica in model.replicas:
            if replica.id == replica_id and not replica.in_flight:
                model.replicas.remove(replica)
                replica.state = ReplicaState.STOPPED
                if cause == "memory":
                    self.evictions += 1
                return

    def _decide_lru(self, now: float) -> list[Decision]:
        """One replica per model, on demand; the least recently used idle model makes room."""
        decisions: list[Decision] = []
        free = {d: self.options.gpu_memory for d in self.gpus}
        for model in self.models.values():
            for replica in model.replicas:
                free[replica.device] -= model.memory
        evicted: set[int] = set()
        for model in sorted(self.models.values(), key=lambda m: self.trace[m.queue[0]].time
                            if m.queue else math.inf):  # fmt: skip
            if not model.queue or model.replicas:
                continue
            device = max(free, key=lambda d: free[d])
            if free[device] < model.memory:
                idle = sorted(
                    (
                        (m.last_used, m, r)
                        for m in self.models.values()
                        for r in m.replicas
                        if r.state is ReplicaState.READY
                        and not r.in_flight
                        and not m.queue
                        and r.id not in evicted
                    ),
                    key=lambda item: item[0],
                )
                for device in free:
                    victims = []
                    room = free[device]
                    for _, m, r in idle:
                        if room >= model.memory:
                            break
                        if r.device == device:
                            victims.append((m, r))
                            room += m.memory
                    if room >= model.memory:
                        break
                else:
                    decisions.append(Blocked(model.name, "no GPU can make room"))
                    continue
                for m, r in victims:
                    decisions.append(StopReplica(m.name, r.id, "least recently used", "memory"))
                    evicted.add(r.id)
                    free[device] += m.memory
            decisions.append(StartReplica(model.name, device, "a request waits"))
            free[device] -= model.memory
        return decisions

    def _place_static(self) -> None:
        """First fit by decreasing size; resident from the start; what does not fit is lost."""
        if self.policy_name == "dedicated":  # the baseline: model i alone on GPU i
            for device, model in zip(self.gpus, self.models.values(), strict=False):
                self._next_id += 1
                model.replicas.append(_Replica(self._next_id, model, device, ReplicaState.READY))
                model.in_host_memory = True
            return
        free = {d: self.options.gpu_memory for d in self.gpus}
        for model in sorted(self.models.values(), key=lambda m: (-m.memory, m.name)):
            for device in free:
                if free[device] >= model.memory:
                    free[device] -= model.memory
                    self._next_id += 1
                    replica = _Replica(self._next_id, model, device, ReplicaState.READY)
                    model.replicas.append(replica)
                    model.in_host_memory = True
                    break


def simulate(
    trace: list[TraceRequest], options: SimulationOptions, gpus: int, policy: str | None = None
) -> SimulationResult:
    """Replay ``trace`` on ``gpus`` GPUs under ``policy`` (default: the options')."""
    return _Simulation(trace, options, gpus, policy or options.policy).run()


def plan(trace: list[TraceRequest], options: SimulationOptions) -> dict[str, Any]:
    """The fewest GPUs that meet the target under the policy, and one model per GPU."""
    options.check()
    models = model_sizes(trace, options)
    baseline = simulate(trace, options, max(1, len(models)), "dedicated")
    if options.gpus is not None:
        chosen = simulate(trace, options, options.gpus)
        searched = False
    else:
        chosen = _fewest_gpus(trace, options, max(1, len(models)))
        searched = True
    return {
        "requests": len(trace),
        "models": len(models),
        "policy": options.policy,
        "gpus": chosen.gpus,
        "searched": searched,
        "slo_attainment": round(chosen.slo_attainment, 6),
        "target": options.target,
        "meets_target": chosen.slo_attainment >= options.target,
        "baseline_gpus": baseline.gpus,
        "baseline_slo_attainment": round(baseline.slo_attainment, 6),
        "gpu_saving": round(1 - chosen.gpus / baseline.gpus, 6) if baseline.gpus else 0.0,
        "cold_starts": chosen.cold_starts,
        "evictions": chosen.evictions,
        "p99_wait_seconds": _finite(chosen.p99_wait),
        "options": {
            "gpu_memory": options.gpu_memory,
            "max_batch": options.max_batch,
            "pcie_gbps": options.pcie_gbps,
            "disk_gbps": options.disk_gbps,
            "slo": options.slo,
        },
    }


def _fewest_gpus(
    trace: list[TraceRequest], options: SimulationOptions, most: int
) -> SimulationResult:
    """The fewest GPUs that meet ``options.target``: from 1..most, doubling past it if needed."""
    results: dict[int, SimulationResult] = {}

    def run(gpus: int) -> SimulationResult:
        if gpus not in results:
            results[gpus] = simulate(trace, options, gpus)
        return results[gpus]

    low, high = 1, most
    while run(high).slo_attainment < options.target:
        more = min(_MOST_GPUS, high * 2)  # busy models may need several GPUs each
        if high >= _MOST_GPUS or run(more).slo_attainment <= results[high].slo_attainment:
            return results[high]  # more GPUs do not help: the target cannot be met
        low, high = high + 1, more
    while low < high:
        middle = (low + high) // 2
        if run(middle).slo_attainment >= options.target:
            high = middle
        else:
            low = middle + 1
    return run(low)


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def parse_options(
    gpu_memory: str = "80GiB",
    max_batch: int = 16,
    pcie_gbps: float = 25.0,
    disk_gbps: float = 2.0,
    slo: str = "2s",
    target: float = 0.99,
    gpus: int | None = None,
    policy: str = "omni",
) -> SimulationOptions:
    """Options from the command line's strings; a bad one raises ``TraceError`` naming it."""
    try:
        memory = parse_size(gpu_memory)
    except ValueError as exc:
        raise TraceError(f"--gpu-memory: {exc}") from None
    try:
        seconds = parse_duration(slo)
    except ValueError as exc:
        raise TraceError(f"--slo: {exc}") from None
    options = SimulationOptions(
        gpu_memory=memory,
        max_batch=max_batch,
        pcie_gbps=pcie_gbps,
        disk_gbps=disk_gbps,
        slo=seconds,
        target=target,
        gpus=gpus,
        policy=policy,
    )
    options.check()
    return options
