"""The controller: the one reconcile loop that starts, stops, parks and wakes replicas.

Every tick (and at once when a request has to wait) it measures each replica's memory, shows
the policy a view of the node, and applies what the policy decides (its ``ReplicaActuator``
does each start, stop, park and wake), logging each decision with its reason and counting it
in the metrics. It touches workers only through a
``WorkersBackend`` and reads time only from its clock, so the same code serves live (worker
processes, ``time.monotonic``) and in ``omni-runtime simulate`` (simulated workers, a
virtual clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from omni_runtime.config import SchedulerSettings, ServerSettings
from omni_runtime.discovery import ModelSpec, PackageFailure
from omni_runtime.isolation import node_memory_bytes
from omni_runtime.metrics import Metrics, ModelGauges
from omni_runtime.scheduler.actuator import ReplicaActuator
from omni_runtime.scheduler.backend import Clock, Worker, WorkersBackend
from omni_runtime.scheduler.decisions import (
    Blocked,
    ParkReplica,
    StartReplica,
    StopReplica,
    WakeReplica,
)
from omni_runtime.scheduler.models import ServedModel
from omni_runtime.scheduler.policy import Policy, SchedulerPolicy
from omni_runtime.scheduler.queue import ModelUnavailable
from omni_runtime.scheduler.views import (
    ModelView,
    NodeView,
    ReplicaState,
    gpu_held,
    gpu_key,
    host_held,
)

__all__ = ["Controller", "host_budget"]

log = logging.getLogger("omni.scheduler")
TICK = 1.0  # seconds between reconciles when nothing wakes the loop (Knative: 2 s)
_MEASURE_EVERY = 1.0
_RUNTIME_RESERVE = 1 << 30
PCIE_GBPS = 25.0  # host <-> GPU, GB/s: what waking a parked replica is estimated to cost


def host_budget(settings: SchedulerSettings) -> int:
    """``scheduler.host_memory``, else the node's memory less 1 GiB for the runtime."""
    if settings.host_memory:
        return settings.host_memory
    return max(_RUNTIME_RESERVE, node_memory_bytes() - _RUNTIME_RESERVE)


class Controller:
    """Every model this node serves, and the loop that sizes their replicas."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        settings: ServerSettings,
        metrics: Metrics,
        backend: WorkersBackend,
        scheduler: SchedulerSettings | None = None,
        gpus: dict[str, int] | None = None,
        *,
        clock: Clock = time.monotonic,
        policy: Policy | None = None,
        host_memory: int | None = None,
        failures: list[PackageFailure] | None = None,
        env_seconds: dict[Path, float] | None = None,
        pcie_gbps: float = PCIE_GBPS,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler or SchedulerSettings()
        self.metrics = metrics
        self.backend = backend
        self.clock = clock
        self.models = {
            spec.name: ServedModel(spec, settings, metrics, self.wake, clock) for spec in specs
        }
        self.failures: list[PackageFailure] = failures or []
        self.policy: Policy = policy or SchedulerPolicy(
            self.scheduler.stable_window, self.scheduler.panic_window
        )
        overcommit = self.scheduler.gpu_overcommit
        self.node = NodeView(
            host_memory=host_memory or host_budget(self.scheduler),
            gpu_budgets={k: int(v * overcommit) for k, v in (gpus or {}).items()},
        )
        self.pcie_gbps = pcie_gbps
        self.generation = 0  # counts the models added and removed while serving
        self.started = False  # start() has run: the node answers ready
        self.closing = False
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._measured_at = -math.inf
        self._arrivals: dict[str, deque[tuple[float, int]]] = {m: deque() for m in self.models}
        # Starts, stops, parks and wakes replicas: what the decisions below do.
        self.actuator = ReplicaActuator(
            self.models, settings, metrics, backend, clock, self.wake, dict(env_seconds or {})
        )
        metrics.watch_models(self._gauges)

    def _gauges(self) -> list[ModelGauges]:
        """Each model version's replicas, queue and memory, read when ``/metrics`` is scraped."""
        return [
            ModelGauges(
                *m.labels,
                replicas=m.ready_replicas,
                parked=sum(1 for r in m.replicas if r.state is ReplicaState.PARKED),
                queued=len(m.queue),
                host_bytes=sum(r.worker.memory_bytes() for r in m.replicas),
                gpu_bytes=sum(r.worker.gpu_memory_bytes() for r in m.replicas),
            )
            for m in list(self.models.values())
        ]

    # -- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        """Reconcile now rather than at the next tick (a request is waiting)."""
        self._wake.set()

    async def start(self) -> None:
        """Start the loops and the replicas ``min_replicas`` asks for; wait for those."""
        self._loops = [
            asyncio.create_task(self._run()),
            asyncio.create_task(self.backend.run(self._ready_workers)),
        ]
        self.actuator.starting = []
        self.reconcile()
        starting, self.actuator.starting = self.actuator.starting, None
        await asyncio.gather(*starting, return_exceptions=True)
        self.started = True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # a bug here must not stop scheduling for every model
                log.exception("the scheduler's reconcile failed; trying again next tick")

    def _ready_workers(self) -> list[Worker]:
        return [
            r.worker
            for m in self.models.values()
            for r in m.replicas
            if r.state is ReplicaState.READY
        ]

    def reconcile(self) -> None:
        """Measure, ask the policy, apply its decisions."""
        now = self.clock()
        if now - self._measured_at >= _MEASURE_EVERY:
            self._measured_at = now
            for model in self.models.values():
                if model.replicas:
                    model.measure()
        # A model with nothing running, nothing asked of it and nothing wanted stays that way
        # until a request arrives: the policy need not look at it (this keeps a node with
        # hundreds of idle models, and a long simulation, cheap).
        views = [self._view(m, now) for m in self.models.values() if not self._quiet(m)]
        self.policy.observe(now, views)
        # What the backend holds beside the replicas (pre-warmed processes) is not theirs.
        node = dataclasses.replace(
            self.node, host_memory=self.node.host_memory - self.backend.reserved_host_bytes()
        )
        decisions = self.policy.decide(now, node, views)
        blocked = {d.model: d.reason for d in decisions if isinstance(d, Blocked)}
        memory_short = any(d.host_memory for d in decisions if isinstance(d, Blocked))
        self.backend.reconcile(now, memory_short, self.policy.last_request)
        for decision in decisions:
            model = self.models[decision.model]
            if isinstance(decision, StartReplica):
                self.actuator.start(model, decision.device, decision.reason)
                continue
            if isinstance(decision, Blocked):
                continue
            replica = next((r for r in model.replicas if r.id == decision.replica), None)
            if replica is None:
                continue
            if isinstance(decision, StopReplica):
                self.actuator.stop(model, replica, decision.reason, decision.cause)
            elif isinstance(decision, ParkReplica):
                self.actuator.park(model, replica, decision.reason, decision.cause)
            elif isinstance(decision, WakeReplica):
                self.actuator.wake(model, replica, decision.reason)
        for model in self.models.values():
            reason = blocked.get(model.name, "")
            if reason and not model.blocked:
                log.warning(
                    "model '%s' needs a replica but none fits: %s; its requests wait",
                    model.name, reason,
                )  # fmt: skip
            elif model.blocked and not reason:
                log.info("model '%s' has room again", model.name)
            model.blocked = reason

    def _quiet(self, model: ServedModel) -> bool:
        target = self.policy.targets.get(model.name)
        return (
            target is not None
            and target.replicas == 0
            and not model.replicas
            and not model.queue
            and not model.in_flight
            and not model.arrived
            and model.spec.scaling.min_replicas == 0
        )

    def _view(self, model: ServedModel, now: float) -> ModelView:
        arrivals = self._arrivals[model.name]
        arrived, model.arrived = model.arrived, 0
        if arrived:
            arrivals.append((now, arrived))
            model.recent_requests += arrived
        horizon = now - self.scheduler.stable_window
        while arrivals and arrivals[0][0] < horizon:
            model.recent_requests -= arrivals.popleft()[1]
        return ModelView(
            name=model.name,
            scaling=model.spec.scaling,
            host_bytes=model.expected_host,
            gpu_bytes=model.expected_gpu,
            device=model.spec.device,
            queued=len(model.queue),
            in_flight=model.in_flight,
            arrived=arrived,
            load_seconds=model.load_seconds or 1.0,
            wake_seconds=model.expected_gpu / (self.pcie_gbps * 1e9),
            recent_requests=float(model.recent_requests),
            serving=model.wanted and not model.closing and not model.unloading,
            not_before=model.not_before,
            replicas=[r.view() for r in model.replicas],
        )

    # -- operators -----------------------------------------------------------------------

    async def load(self, model: ServedModel) -> str:
        """Make the model serve again (after an unload or a failed start) with a replica.

        Returns "" once a replica is ready, else why not. The wait holds no lock, so an
        unload or a shutdown meanwhile ends it at once.
        """
        async with model.lifecycle:
            if model.closing:
                return f"model '{model.name}' cannot load: the runtime is stopping"
            model.wanted = True
            model.failure = ""
            model.not_before = 0.0
            model.restarts = 0
        deadline = self.clock() + self.settings.load_timeout
        while not model.ready_replicas:
            if model.failure:
                return model.failure
            if model.closing or not model.wanted or model.unloading:
                return f"model '{model.name}' was unloaded while it loaded"
            remaining = deadline - self.clock()
            if remaining <= 0:
                return (
                    f"model '{model.name}' did not become ready within "
                    f"{self.settings.load_timeout:.0f}s (server.load_timeout)"
                )
            model.changed.clear()
            model.touch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(model.changed.wait(), min(remaining, 1.0))
        return ""

    async def unload(self, model: ServedModel, reason: str = "unloaded") -> None:
        """Stop taking requests, let those in flight finish, then stop every replica."""
        async with model.lifecycle:
            model.unloading = True
            model.changed.set()  # a load waiting for a replica gives up
            try:
                model.fail_waiting(
                    ModelUnavailable(f"model '{model.name}' is unavailable: {reason}", 5)
                )
                await asyncio.gather(
                    *(self.actuator.stop(model, r, reason, "unload") for r in list(model.replicas))
                )
            finally:
                model.unloading = False
            model.wanted = False

    def add(self, spec: ModelSpec, key: str | None = None) -> ServedModel:
        """Serve one more model (scaled to zero: it starts on its first request), under
        ``key`` where another version of it is served already."""
        key = key or spec.name
        if key in self.models:
            raise ValueError(f"model '{key}' is served already")
        model = ServedModel(spec, self.settings, self.metrics, self.wake, self.clock, key)
        model.closing = self.closing
        self.models[key] = model
        self._arrivals[key] = deque()
        self.generation += 1
        self.wake()
        return model

    def rekey(self, old: str, new: str) -> None:
        """Know the model ``old`` as ``new`` from now on (a version promoted, or retired)."""
        if new in self.models:
            raise ValueError(f"model '{new}' is served already")
        model = self.models.pop(old)
        model.name = new
        self.models[new] = model
        self._arrivals[new] = self._arrivals.pop(old, deque())
        self.generation += 1  # (the policy sees it under its new name at the next tick)

    async def remove(self, name: str, reason: str) -> None:
        """Stop serving a model: those in flight finish, then it is forgotten."""
        model = self.models.get(name)
        if model is None:
            return
        await self.unload(model, reason)
        if self.models.get(name) is model:
            del self.models[name]
            self._arrivals.pop(name, None)
            self.generation += 1

    async def drain(self) -> None:
        """Shutting down: refuse new requests, give those admitted ``drain_timeout`` to finish."""
        self.closing = True
        for model in self.models.values():
            model.closing = True
            model.changed.set()
            for replica in model.replicas:
                if replica.state is ReplicaState.STARTING:
                    replica.stop_reason = "runtime shutting down"
                    replica.worker.abort()  # nobody will be served by it
        deadline = self.clock() + self.settings.drain_timeout
        while self.clock() < deadline and any(m.in_flight or m.queue for m in self.models.values()):
            await asyncio.sleep(0.05)
        for model in self.models.values():
            model.fail_waiting(model.unavailable())
            for replica in model.replicas:
                if replica.in_flight:
                    log.warning(
                        "model '%s': %d requests still in flight after %.0fs "
                        "(server.drain_timeout); stopping anyway",
                        model.name, replica.in_flight, self.settings.drain_timeout,
                    )  # fmt: skip
                    replica.stop_reason = "runtime shutting down"
                    replica.worker.kill()  # its requests get a 503, not a dropped connection

    async def stop(self) -> None:
        """Stop the loops and every replica."""
        self.closing = True
        for task in self._loops:
            task.cancel()
        for model in self.models.values():
            model.closing = True
        await asyncio.gather(
            *(self.unload(m, "runtime shutting down") for m in self.models.values())
        )
        await self.backend.close()

    def has_room_for(self, model: ServedModel) -> bool:
        """Room to spare for one more replica of ``model``: no model waits for memory, and
        twice its expected memory is free on the host (and on a GPU, for a CUDA model).
        Background (batch) work starts a scaled-to-zero model only then."""
        if any(m.blocked for m in self.models.values()):
            return False
        views = [r.view() for m in self.models.values() for r in m.replicas]
        host = self.node.host_memory - self.backend.reserved_host_bytes()
        if host - sum(host_held(v) for v in views) < 2 * model.expected_host:
            return False
        if model.spec.device.startswith("cuda") and self.node.gpu_budgets:
            free_gpu = max(
                budget - sum(gpu_held(v) for v in views if gpu_key(v.device) == gpu)
                for gpu, budget in self.node.gpu_budgets.items()
            )
            return free_gpu >= 2 * model.expected_gpu
        return True

    @property
    def ready(self) -> bool:
        """The node serves: started and not shutting down (a model's own trouble is its
        own: ``/v2/models/{name}/ready`` tells)."""
        return self.started and not self.closing
