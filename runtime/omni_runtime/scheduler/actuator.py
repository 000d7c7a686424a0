"""What the controller's decisions do: start, stop, park and wake replicas, each in a task.

``ReplicaActuator`` carries out each decision through the workers backend and watches each
worker until it is gone; a failed start or a crash backs off before the model may start again.
Only the ``Controller`` calls it: from its reconcile, and for an operator's unload and shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from omni_runtime.config import ServerSettings
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler.backend import Clock, LoadFailed, Worker, WorkersBackend
from omni_runtime.scheduler.models import ServedModel
from omni_runtime.scheduler.queue import ModelUnavailable
from omni_runtime.scheduler.replica import Replica
from omni_runtime.scheduler.views import ReplicaState
from omni_runtime.scheduler.warmup import wants_warm_up, warm_up

__all__ = ["ReplicaActuator", "backoff"]

log = logging.getLogger("omni.scheduler")
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a worker that lived this long resets the backoff


def backoff(attempt: int) -> float:
    """Seconds before the next start after ``attempt`` failures in a row (0.2 s doubling)."""
    return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, attempt - 1)))


class ReplicaActuator:
    """Every replica's start, drain, park and wake, and the tasks that carry them out."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        settings: ServerSettings,
        metrics: Metrics,
        backend: WorkersBackend,
        clock: Clock,
        wake: Callable[[], None],
        env_seconds: dict[Path, float],
    ) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.backend = backend
        self.clock = clock
        self._reconcile_now = wake  # asks the controller to reconcile now
        self.env_seconds = env_seconds  # paid once per package, at discovery
        self.starting: list[asyncio.Task[None]] | None = None  # collected during a start()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_replica = 0

    def start(self, model: ServedModel, device: str, reason: str) -> None:
        """Start a replica of ``model`` on ``device``; it takes requests once ready."""
        self._next_replica += 1
        spec = model.spec
        if device != spec.device:  # "cuda" placed on one GPU of several
            spec = dataclasses.replace(spec, device=device)
        worker = self.backend.worker(spec)
        replica = Replica(self._next_replica, worker, model.capacity, self.clock())
        replica.host_bytes = model.expected_host
        replica.gpu_bytes = model.expected_gpu
        model.replicas.append(replica)
        log.info("model '%s': starting replica %d (%s)", model.name, replica.id, reason)
        task = self._spawn(self._start(model, replica, reason))
        if self.starting is not None:
            self.starting.append(task)

    async def _start(self, model: ServedModel, replica: Replica, reason: str) -> None:
        worker = replica.worker
        self.metrics.cold_starts.labels(*model.labels).inc()
        try:
            await worker.start()
            if wants_warm_up(model):
                await warm_up(model, worker, self.settings.load_timeout)
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
        self.metrics.load_seconds.labels(*model.labels).observe(worker.load_seconds)
        if replica.stop_reason is not None:
            await worker.stop(timeout=5)
            self._remove(model, replica, ReplicaState.STOPPED)
            return
        if model.failure:
            log.info("model '%s' started again after failing: %s", model.name, model.failure)
        model.failure = ""
        model.restarts = 0
        self._record_cold_start(model, worker)
        worker.count_compute(model.stats.compute)
        replica.state = ReplicaState.READY
        replica.idle_since = self.clock()
        model.measure()
        model.changed.set()
        log.info(
            "model '%s' ready: replica %d, worker pid %s, %s in %.2fs (%s)",
            model.name, replica.id, worker.pid,
            "forked from a pre-warmed process" if worker.forked else (
                f"started (not pre-warmed: {worker.not_prewarmed})"
                if worker.not_prewarmed else "started"
            ),
            worker.load_seconds, reason,
        )  # fmt: skip
        self.backend.started(worker, any(m.blocked for m in self.models.values()))
        self._spawn(self._watch(model, replica))
        model.hand_over(replica)

    def _start_failed(self, model: ServedModel, error: str) -> None:
        """Back off, then try again when the model is wanted: a failed start is not final."""
        model.restarts += 1
        delay = backoff(model.restarts)
        model.not_before = self.clock() + delay
        others = [
            r for r in model.replicas if r.state in (ReplicaState.READY, ReplicaState.STARTING)
        ]
        if others:
            log.error(
                "%s; %d other replicas serve, trying again in %.1fs", error, len(others), delay
            )
            return
        model.failure = error
        model.changed.set()
        log.error("%s; trying again in %.1fs if it is still wanted", error, delay)
        model.fail_waiting(ModelUnavailable(error, max(1, math.ceil(delay))))

    def _record_cold_start(self, model: ServedModel, worker: Worker) -> None:
        phases = self.metrics.cold_start
        env = self.env_seconds.pop(model.spec.package_dir, 0.0)  # paid once, at discovery
        t = worker.timings
        for phase, seconds in (
            ("env", env), ("spawn", t.spawn), ("import", t.import_), ("load", t.load),
        ):  # fmt: skip
            phases.labels(*model.labels, phase).observe(seconds)

    async def _watch(self, model: ServedModel, replica: Replica) -> None:
        worker = replica.worker
        returncode = await worker.wait()
        if replica.stop_reason is not None:
            self._remove(model, replica, ReplicaState.STOPPED)  # stopped on purpose
            return
        self._remove(model, replica, ReplicaState.FAILED)
        lived = self.clock() - worker.started_at
        model.restarts = 0 if lived > _STABLE_AFTER else model.restarts + 1
        delay = backoff(model.restarts)
        model.not_before = self.clock() + delay
        cause = "hung" if worker.hung_after else "oom" if worker.oom_killed else "crash"
        self.metrics.evictions.labels(*model.labels, cause).inc()
        log.warning(
            "model '%s': worker pid %s %s; a new replica may start in %.1fs if it is needed",
            model.name, worker.pid, worker.exit_reason(returncode), delay,
        )  # fmt: skip
        self._reconcile_now()

    def park(self, model: ServedModel, replica: Replica, reason: str, cause: str) -> None:
        """Move an idle replica's device memory to the host; its process stays.

        Its state changes here, in the reconcile that decided it, before any request can be
        handed to it; the move itself goes on in a task."""
        if replica.state is not ReplicaState.READY or replica.in_flight:
            return
        replica.state = ReplicaState.PARKED
        replica.on_host = True
        self.metrics.evictions.labels(*model.labels, cause).inc()
        log.info("model '%s': parked replica %d (%s)", model.name, replica.id, reason)
        self._spawn(replica.worker.park())

    def wake(self, model: ServedModel, replica: Replica, reason: str) -> None:
        """Wake a parked replica, in a task."""
        self._spawn(self._wake_replica(model, replica, reason))

    async def _wake_replica(self, model: ServedModel, replica: Replica, reason: str) -> None:
        """Bring a parked replica's memory back to its device, then give it requests."""
        if replica.state is not ReplicaState.PARKED:
            return
        replica.state = ReplicaState.STARTING
        replica.waking = True
        started = self.clock()
        try:
            await replica.worker.wake()
        finally:
            replica.waking = False
            replica.on_host = False
        if replica.state is not ReplicaState.STARTING:
            return  # stopped meanwhile
        replica.state = ReplicaState.READY
        self.metrics.wakes.labels(*model.labels).inc()
        log.info(
            "model '%s': woke replica %d in %.3fs (%s)",
            model.name, replica.id, self.clock() - started, reason,
        )  # fmt: skip
        model.changed.set()
        model.hand_over(replica)

    def stop(
        self, model: ServedModel, replica: Replica, reason: str, cause: str
    ) -> asyncio.Task[None]:
        """Drain the replica (no new requests; those in flight finish), then stop it.

        It stops taking requests here, in the caller's step (a reconcile that decided it);
        the returned task ends once it is gone."""
        worker = replica.worker
        if replica.stop_reason is not None or worker.returncode is not None:
            return self._spawn(_gone(replica))  # already stopping, or its watcher reports
        replica.stop_reason = reason
        if replica.state is ReplicaState.STARTING and not replica.waking:
            worker.abort()  # its start fails, and _start removes it
            return self._spawn(_gone(replica))
        replica.state = ReplicaState.DRAINING
        return self._spawn(self._drain_and_stop(model, replica, reason, cause))

    async def _drain_and_stop(
        self, model: ServedModel, replica: Replica, reason: str, cause: str
    ) -> None:
        worker = replica.worker
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
            self.metrics.evictions.labels(*model.labels, cause).inc()
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


async def _gone(replica: Replica) -> None:
    await replica.gone.wait()
