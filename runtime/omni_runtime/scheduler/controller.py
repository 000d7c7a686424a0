"""The controller: the one reconcile loop that starts, stops and restarts replicas.

Every tick (and at once when a request has to wait) it measures each replica's memory, shows
the policy a view of the node, and applies what the policy decides: starting replicas,
draining and stopping them, logging each with its reason and counting it in the metrics. It
also watches for workers that crashed or stopped answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from omni_runtime.config import SchedulerSettings, ServerSettings
from omni_runtime.discovery import Discovery, PackageFailure
from omni_runtime.isolation import CgroupError, Isolation, node_memory_bytes
from omni_runtime.isolation.plan import worker_environment
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler.models import ModelState, Replica, ServedModel
from omni_runtime.scheduler.policy import (
    Blocked,
    ModelView,
    NodeView,
    ReplicaState,
    SchedulerPolicy,
    StartReplica,
    StopReplica,
    gpu_key,
)
from omni_runtime.scheduler.queue import ModelUnavailable
from omni_runtime.workers import LoadFailed, WorkerProcess
from omni_runtime.workers.prewarm import PrewarmedProcess, trusted_modules

__all__ = ["Controller", "host_budget"]

log = logging.getLogger("omni.scheduler")
TICK = 0.25  # seconds between reconciles when nothing wakes the loop
_MEASURE_EVERY = 1.0
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a worker that lived this long resets the backoff
_RUNTIME_RESERVE = 1 << 30


def host_budget(settings: SchedulerSettings) -> int:
    """``scheduler.host_memory``, else the node's memory less 1 GiB for the runtime."""
    if settings.host_memory:
        return settings.host_memory
    return max(_RUNTIME_RESERVE, node_memory_bytes() - _RUNTIME_RESERVE)


class Controller:
    """Every model this runtime serves, and the loop that sizes their replicas."""

    def __init__(
        self,
        discovery: Discovery,
        settings: ServerSettings,
        metrics: Metrics,
        isolation: Isolation | None = None,
        scheduler: SchedulerSettings | None = None,
        gpus: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler or SchedulerSettings()
        self.metrics = metrics
        self.isolation = isolation or Isolation()
        self.models = {
            spec.name: ServedModel(spec, settings, metrics, self.wake) for spec in discovery.models
        }
        self.failures: list[PackageFailure] = discovery.failures
        self.env_seconds = {path: env.seconds for path, env in discovery.environments.items()}
        self.policy = SchedulerPolicy(self.scheduler.stable_window, self.scheduler.panic_window)
        overcommit = self.scheduler.gpu_overcommit
        self.node = NodeView(
            host_memory=host_budget(self.scheduler),
            gpu_budgets={k: int(v * overcommit) for k, v in (gpus or {}).items()},
        )
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._next_replica = 0
        self._next_prewarm = 0
        self._measured_at = 0.0
        self._arrivals: dict[str, deque[tuple[float, int]]] = {m: deque() for m in self.models}
        self._starting: list[asyncio.Task[None]] | None = None  # collected during start()
        self.prewarmed: dict[str, PrewarmedProcess] = {}  # the current one, by model
        self._prewarmed_all: set[PrewarmedProcess] = set()  # current and retiring ones

    # -- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        """Reconcile now rather than at the next tick (a request is waiting)."""
        self._wake.set()

    async def start(self) -> None:
        """Start the loops and the replicas ``min_replicas`` asks for; wait for those."""
        self._loop = asyncio.create_task(self._run())
        self._watchdog = asyncio.create_task(self._watch_heartbeats())
        self._starting = []
        self.reconcile()
        starting, self._starting = self._starting, None
        await asyncio.gather(*starting, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # a bug here must not stop scheduling for every model
                log.exception("the scheduler's reconcile failed; trying again next tick")

    def reconcile(self) -> None:
        """Measure, ask the policy, apply its decisions."""
        now = time.monotonic()
        if now - self._measured_at >= _MEASURE_EVERY:
            self._measured_at = now
            for model in self.models.values():
                for replica in model.replicas:
                    if replica.state is ReplicaState.READY:
                        self._measure(model, replica)
        views = [self._view(model, now) for model in self.models.values()]
        self.policy.observe(now, views)
        # Pre-warmed processes hold memory too: the replicas' budget is what they leave.
        budget = self.node.host_memory
        self.node.host_memory = budget - sum(p.memory_bytes() for p in self._prewarmed_all)
        try:
            decisions = self.policy.decide(now, self.node, views)
        finally:
            self.node.host_memory = budget
        blocked = {d.model: d.reason for d in decisions if isinstance(d, Blocked)}
        self._retire_prewarmed(now, any("host_memory" in r for r in blocked.values()))
        for decision in decisions:
            model = self.models[decision.model]
            if isinstance(decision, StartReplica):
                self._start_replica(model, decision.device, decision.reason)
            elif isinstance(decision, StopReplica):
                victim = next((r for r in model.replicas if r.id == decision.replica), None)
                if victim is not None:
                    self._spawn(self._stop(model, victim, decision.reason, decision.cause))
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
            self._prefetch_idle(model, now)

    def _view(self, model: ServedModel, now: float) -> ModelView:
        arrivals = self._arrivals[model.name]
        arrived, model.arrived = model.arrived, 0
        if arrived:
            arrivals.append((now, arrived))
        while arrivals and arrivals[0][0] < now - self.scheduler.stable_window:
            arrivals.popleft()
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
            recent_requests=float(sum(n for _, n in arrivals)),
            serving=model.wanted
            and not model.failure
            and not model.closing
            and not model.unloading,
            not_before=model.not_before,
            replicas=[r.view() for r in model.replicas],
        )

    def _measure(self, model: ServedModel, replica: Replica) -> None:
        """Its measured footprint replaces the reservation, and is remembered for next time."""
        host = replica.worker.memory_bytes()
        if host:
            replica.peak_host = max(replica.peak_host, host)
            replica.host_bytes = replica.peak_host
            model.measured_host = max(model.measured_host, replica.peak_host)
            model.expected_host = model.measured_host
        gpu = replica.worker.gpu_memory_bytes()
        if gpu:
            replica.peak_gpu = max(replica.peak_gpu, gpu)
            replica.gpu_bytes = replica.peak_gpu
            model.measured_gpu = max(model.measured_gpu, replica.peak_gpu)
            model.expected_gpu = model.measured_gpu

    def _prefetch_idle(self, model: ServedModel, now: float) -> None:
        """On a GPU, an idle replica's memory goes to the host; the next request brings it back."""
        if not model.spec.device.startswith("cuda"):
            return
        for replica in model.replicas:
            idle_for = now - replica.idle_since
            if (
                replica.state is ReplicaState.READY
                and not replica.in_flight
                and not replica.on_host
                and idle_for >= self.scheduler.panic_window
            ):
                replica.on_host = True
                replica.worker.prefetch("host")

    # -- starting and stopping -----------------------------------------------------------

    def _start_replica(self, model: ServedModel, device: str, reason: str) -> None:
        self._next_replica += 1
        spec = model.spec
        if device != spec.device:  # "cuda" placed on one GPU of several
            spec = dataclasses.replace(spec, device=device)
        prewarmed = self.prewarmed.get(spec.name)
        if prewarmed is not None and not prewarmed.alive:
            prewarmed = None
        worker = WorkerProcess(spec, self.settings, self.isolation, prewarmed)
        replica = Replica(self._next_replica, worker, model.capacity)
        replica.host_bytes = model.expected_host
        replica.gpu_bytes = model.expected_gpu
        model.replicas.append(replica)
        log.info("model '%s': starting replica %d (%s)", model.name, replica.id, reason)
        task = self._spawn(self._start(model, replica, reason))
        if self._starting is not None:
            self._starting.append(task)

    async def _start(self, model: ServedModel, replica: Replica, reason: str) -> None:
        worker = replica.worker
        self.metrics.cold_starts.labels(model.name).inc()
        try:
            await worker.start()
        except Exception as exc:
            if not isinstance(exc, LoadFailed):
                log.exception("model '%s': starting replica %d failed", model.name, replica.id)
                worker.kill()
                exc = LoadFailed(f"model '{model.name}': its worker could not start: {exc}")
            self._remove(model, replica, ReplicaState.FAILED)
            if replica.stop_reason is not None:
                return  # stopped while it started: nobody is waiting for it
            self._start_failed(model, str(exc))
            return
        model.load_seconds = worker.load_seconds
        self.metrics.load_seconds.labels(model.name).observe(worker.load_seconds)
        if replica.stop_reason is not None:
            await worker.stop(timeout=5)
            self._remove(model, replica, ReplicaState.STOPPED)
            return
        self._record_cold_start(model, worker)
        replica.state = ReplicaState.READY
        replica.idle_since = time.monotonic()
        self._measure(model, replica)
        model.changed.set()
        log.info(
            "model '%s' ready: replica %d, worker pid %s, %s in %.2fs (%s)",
            model.name, replica.id, worker.pid,
            "forked from a pre-warmed process" if worker.forked else "started",
            worker.load_seconds, reason,
        )  # fmt: skip
        if self.scheduler.prewarm_timeout and not worker.spec.device.startswith("cuda"):
            self._prewarm(worker)
        self._spawn(self._watch(model, replica))
        model.hand_over(replica)

    def _start_failed(self, model: ServedModel, error: str) -> None:
        others = [
            r for r in model.replicas if r.state in (ReplicaState.READY, ReplicaState.STARTING)
        ]
        if others:
            # The model still serves: back off before trying another replica.
            model.restarts += 1
            delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, model.restarts - 1))
            model.not_before = time.monotonic() + delay
            log.error(
                "%s; %d other replicas serve, trying again in %.1fs", error, len(others), delay
            )
            return
        model.failure = error
        model.changed.set()
        log.error("%s", error)
        model.fail_waiting(ModelUnavailable(error, 5))

    def _prewarm(self, worker: WorkerProcess) -> None:
        """Keep a pre-warmed process for this worker's model, preloading what it used.

        One per model, not per environment: it runs inside the model's sandbox (its user, its
        view of the files, its network), which its forks share.
        """
        spec = worker.spec
        wanted = trusted_modules(worker.modules, spec.package_dir)
        current = self.prewarmed.get(spec.name)
        if current is not None and current.alive and set(wanted) <= set(current.preload):
            return
        if any(m.blocked for m in self.models.values()):
            return  # memory is short: no process that only holds memory
        if current is not None:
            current.retire()
        preload = sorted(set(wanted) | set(current.preload if current else []))
        process = PrewarmedProcess(spec.python, preload, label=f"model '{spec.name}'")
        self.prewarmed[spec.name] = process
        self._prewarmed_all.add(process)
        isolation = self.isolation
        environment = Path(spec.python).parent.parent if spec.python != sys.executable else None
        if isolation.cgroups is not None:
            self._next_prewarm += 1
            try:
                process.cgroup = isolation.cgroups.create(
                    f"prewarm-{self._next_prewarm}", spec.resources
                )
            except (CgroupError, OSError) as exc:
                log.warning("pre-warmed process for model '%s': no cgroup: %s", spec.name, exc)

        def launcher(fd: int) -> list[str]:
            return isolation.launcher(
                model=spec.name,
                package=spec.package_dir,
                environment=environment,
                memory_limit=spec.resources.memory,
                network=spec.network == "host",
                cgroup=process.cgroup,
                keep_fds=(fd,),
                pid_namespace=False,  # its forks' pids are the ones the runtime sees
            )

        env = worker_environment(os.environ, spec.env, isolation.cache_dir(spec.name))

        async def start() -> None:
            try:
                await process.start(env, launcher)
            except OSError as exc:
                log.warning("no pre-warmed process for model '%s': %s", spec.name, exc)
                process.retired = True
                process.cleanup()
                return
            outside_stdlib = [m for m in preload if m not in sys.stdlib_module_names]
            log.info(
                "pre-warmed process for model '%s': pid %s, preloading %d modules (%s)",
                spec.name, process.process.pid if process.process else "?", len(preload),
                ", ".join(outside_stdlib) or "the standard library",
            )  # fmt: skip

        self._spawn(start())

    def _retire_prewarmed(self, now: float, memory_short: bool) -> None:
        """Retire a pre-warmed process when memory is short or its model has gone idle."""
        for process in list(self._prewarmed_all):
            if process.ended:
                process.cleanup()
                self._prewarmed_all.discard(process)
        for name, process in list(self.prewarmed.items()):
            if not process.alive:
                del self.prewarmed[name]  # retiring: tracked in _prewarmed_all until it ends
                continue
            scaler = self.policy.autoscalers.get(name)
            last = scaler.last_request if scaler is not None else None
            idle = now - max(last or 0.0, process.started_at) >= self.scheduler.prewarm_timeout
            if memory_short or idle:
                why = "memory is short" if memory_short else "its model is idle"
                log.info("retiring the pre-warmed process for model '%s': %s", name, why)
                process.retire()

    def _record_cold_start(self, model: ServedModel, worker: WorkerProcess) -> None:
        phases = self.metrics.cold_start
        env = self.env_seconds.pop(model.spec.package_dir, 0.0)  # paid once, at discovery
        t = worker.timings
        for phase, seconds in (
            ("env", env), ("spawn", t.spawn), ("import", t.import_), ("load", t.load),
        ):  # fmt: skip
            phases.labels(model.name, phase).observe(seconds)

    async def _watch(self, model: ServedModel, replica: Replica) -> None:
        worker = replica.worker
        returncode = await worker.wait()
        if replica.stop_reason is not None:
            self._remove(model, replica, ReplicaState.STOPPED)  # stopped on purpose
            return
        self._remove(model, replica, ReplicaState.FAILED)
        lived = time.monotonic() - worker.started_at
        model.restarts = 0 if lived > _STABLE_AFTER else model.restarts + 1
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, model.restarts - 1))
        model.not_before = time.monotonic() + delay
        cause = "hung" if worker.hung_after else "oom" if worker.oom_killed else "crash"
        self.metrics.evictions.labels(model.name, cause).inc()
        log.warning(
            "model '%s': worker pid %s %s; a new replica may start in %.1fs if it is needed",
            model.name, worker.pid, worker.exit_reason(returncode), delay,
        )  # fmt: skip
        self.wake()

    async def _stop(self, model: ServedModel, replica: Replica, reason: str, cause: str) -> None:
        """Drain the replica (no new requests; those in flight finish), then stop it."""
        if replica.stop_reason is not None:
            await replica.gone.wait()
            return
        worker = replica.worker
        if worker.process is not None and worker.process.returncode is not None:
            await replica.gone.wait()  # it died by itself: its watcher reports how
            return
        replica.stop_reason = reason
        if replica.state is ReplicaState.STARTING:
            worker.abort()  # its start fails, and _start removes it
            await replica.gone.wait()
            return
        replica.state = ReplicaState.DRAINING
        try:
            await asyncio.wait_for(replica.idle.wait(), self.settings.drain_timeout)
        except TimeoutError:
            log.warning(
                "model '%s': replica %d still has %d requests in flight after %.0fs "
                "(server.drain_timeout); stopping it anyway",
                model.name, replica.id, replica.in_flight, self.settings.drain_timeout,
            )  # fmt: skip
        await worker.stop(timeout=10)
        self._remove(model, replica, ReplicaState.STOPPED)
        if cause != "unload":
            self.metrics.evictions.labels(model.name, cause).inc()
        log.info(
            "model '%s': stopped replica %d, worker pid %s (%s)",
            model.name, replica.id, worker.pid, reason,
        )  # fmt: skip

    def _remove(self, model: ServedModel, replica: Replica, state: ReplicaState) -> None:
        replica.state = state
        if replica in model.replicas:
            model.replicas.remove(replica)
        replica.gone.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a scheduler task failed", exc_info=task.exception())

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
        deadline = time.monotonic() + self.settings.load_timeout
        while not model.ready_replicas:
            if model.failure:
                return model.failure
            if model.closing or not model.wanted or model.unloading:
                return f"model '{model.name}' was unloaded while it loaded"
            remaining = deadline - time.monotonic()
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
                    *(self._stop(model, r, reason, "unload") for r in list(model.replicas))
                )
            finally:
                model.unloading = False
            model.wanted = False

    async def drain(self) -> None:
        """Shutting down: refuse new requests, give those admitted ``drain_timeout`` to finish."""
        for model in self.models.values():
            model.closing = True
            model.changed.set()
            for replica in model.replicas:
                if replica.state is ReplicaState.STARTING:
                    replica.stop_reason = "runtime shutting down"
                    replica.worker.abort()  # nobody will be served by it
        deadline = time.monotonic() + self.settings.drain_timeout
        while time.monotonic() < deadline and any(
            m.in_flight or m.queue for m in self.models.values()
        ):
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
        for task in (self._loop, self._watchdog):
            if task is not None:
                task.cancel()
        for model in self.models.values():
            model.closing = True
        await asyncio.gather(
            *(self.unload(m, "runtime shutting down") for m in self.models.values())
        )
        for process in self._prewarmed_all:
            process.kill()
            process.cleanup()
        self.isolation.close()

    def has_room_for(self, model: ServedModel) -> bool:
        """Room to spare for one more replica of ``model``: no model waits for memory, and
        twice its expected memory is free on the host (and on a GPU, for a CUDA model).
        Background (batch) work starts a scaled-to-zero model only then."""
        if any(m.blocked for m in self.models.values()):
            return False
        replicas = [r for m in self.models.values() for r in m.replicas]
        free_host = self.node.host_memory - sum(r.host_bytes for r in replicas)
        if free_host < 2 * model.expected_host:
            return False
        if model.spec.device.startswith("cuda") and self.node.gpu_budgets:
            free_gpu = max(
                budget - sum(r.gpu_bytes for r in replicas if gpu_key(r.worker.spec.device) == gpu)
                for gpu, budget in self.node.gpu_budgets.items()
            )
            return free_gpu >= 2 * model.expected_gpu
        return True

    @property
    def ready(self) -> bool:
        return all(m.state is ModelState.READY for m in self.models.values())

    # -- hung workers --------------------------------------------------------------------

    async def _watch_heartbeats(self) -> None:
        """Kill workers that owe an answer and have said nothing for heartbeat_timeout."""
        timeout = self.settings.heartbeat_timeout
        interval = max(0.05, min(5.0, timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for model in self.models.values():
                for replica in list(model.replicas):
                    if replica.state is not ReplicaState.READY:
                        continue  # a load is bounded by server.load_timeout instead
                    try:
                        _check_heartbeat(model, replica.worker, now, timeout)
                    except Exception:  # one odd worker must not end the watch for all
                        log.exception("heartbeat check of model '%s' failed", model.name)


def _check_heartbeat(model: ServedModel, worker: WorkerProcess, now: float, timeout: float) -> None:
    channel = worker.channel
    if channel is None or worker.hung_after:
        return
    silent = channel.silent_for(now)
    if silent > timeout:
        worker.hung_after = silent
        log.error(
            "model '%s': worker pid %s has not answered for %.0fs; killing it",
            model.name, worker.pid, silent,
        )  # fmt: skip
        worker.kill()
    else:
        channel.ping()
