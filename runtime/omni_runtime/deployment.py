"""A served model: its replicas, its state, admission of requests, restarts with backoff."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

from omni_runtime.config import ServerSettings
from omni_runtime.discovery import Discovery, ModelSpec, PackageFailure
from omni_runtime.ipc import Response, WorkerGone
from omni_runtime.isolation import Isolation, node_memory_bytes
from omni_runtime.metrics import Metrics
from omni_runtime.supervisor import LoadFailed, WorkerProcess
from omni_sdk._units import format_size

__all__ = ["ModelBusy", "ModelDeployment", "ModelState", "ModelUnavailable", "Node"]

log = logging.getLogger("omni.deployment")
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a worker that lived this long resets the backoff


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class ModelUnavailable(Exception):
    """503: the model cannot serve right now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelBusy(Exception):
    """429: the model's queue is full, or the client asked not to wait."""


@dataclass
class ModelStats:
    """Counters for ``/v2/models/{name}/stats`` (Triton's statistics extension)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, elapsed_ns: int) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns
        self.last_inference_ms = time.time_ns() // 1_000_000


class ModelDeployment:
    def __init__(
        self,
        spec: ModelSpec,
        settings: ServerSettings,
        metrics: Metrics,
        isolation: Isolation | None = None,
    ) -> None:
        self.spec = spec
        self.isolation = isolation
        self.name = spec.name
        self.settings = settings
        self.metrics = metrics
        self.state = ModelState.UNAVAILABLE
        self.reason = "not loaded"
        self.replicas: list[WorkerProcess] = []
        self.in_flight = 0
        self.stats = ModelStats()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wanted = False  # True between load() and unload()
        self._restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._lifecycle = asyncio.Lock()
        self._queue_limit = spec.scaling.max_queue_size
        self._target = spec.scaling.target_ongoing_requests

    @property
    def replica_count(self) -> int:
        return max(1, self.spec.scaling.min_replicas)

    # -- lifecycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Start the replicas; on failure the model is UNAVAILABLE with the reason."""
        async with self._lifecycle:  # one load or unload at a time
            await self._load()

    async def _load(self) -> None:
        if self._wanted and self.state is ModelState.READY:
            return
        too_big = _exceeds_node(self.spec)
        if too_big:
            self._set_state(ModelState.UNAVAILABLE, too_big)
            log.error("%s", too_big)
            return
        self._wanted = True
        self._restarts = 0
        self._set_state(ModelState.LOADING, "loading")
        missing = self.replica_count - len(self.replicas)
        results = await asyncio.gather(
            *(self._start_replica() for _ in range(missing)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if self.replicas:
            self._set_state(ModelState.READY, "")
        elif failures:
            self._wanted = False
            self._set_state(ModelState.UNAVAILABLE, str(failures[0]))
            log.error("%s", failures[0])

    async def _start_replica(self) -> None:
        worker = WorkerProcess(self.spec, self.settings, self.isolation)
        self.metrics.cold_starts.labels(self.name).inc()
        await worker.start()
        self.metrics.load_seconds.labels(self.name).observe(worker.load_seconds)
        if not self._wanted:  # unloaded while it was starting
            await worker.stop(timeout=5)
            return
        self.replicas.append(worker)
        self.metrics.replicas.labels(self.name).set(len(self.replicas))
        self._spawn(self._watch(worker))

    async def _watch(self, worker: WorkerProcess) -> None:
        returncode = await worker.wait()
        if worker not in self.replicas:
            return  # stopped on purpose
        self.replicas.remove(worker)
        self.metrics.replicas.labels(self.name).set(len(self.replicas))
        lived = time.monotonic() - worker.started_at
        self._restarts = 0 if lived > _STABLE_AFTER else self._restarts + 1
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, self._restarts - 1))
        reason = f"model '{self.name}': worker pid {worker.pid} {worker.exit_reason(returncode)}"
        cause = "hung" if worker.hung_after else "oom" if worker.oom_killed else "crash"
        self.metrics.evictions.labels(self.name, cause).inc()
        if not self.replicas:
            self._set_state(ModelState.LOADING, f"{reason}; restarting")
        log.warning("%s; restarting in %.1fs", reason, delay)
        await asyncio.sleep(delay)
        if not self._wanted:
            return
        try:
            await self._start_replica()
        except LoadFailed as exc:
            log.error("%s", exc)
            if not self.replicas:
                self._spawn(self._retry_later(delay))
            return
        self._set_state(ModelState.READY, "")

    async def _retry_later(self, delay: float) -> None:
        self._restarts += 1
        await asyncio.sleep(min(_BACKOFF_MAX, delay * 2))
        if self._wanted and not self.replicas:
            try:
                await self._start_replica()
                self._set_state(ModelState.READY, "")
            except LoadFailed as exc:
                log.error("%s", exc)
                self._spawn(self._retry_later(delay * 2))

    async def unload(self, reason: str = "unloaded") -> None:
        """Stop taking requests, let those in flight finish, then stop the workers."""
        async with self._lifecycle:
            await self._unload(reason)

    async def _unload(self, reason: str) -> None:
        self._wanted = False
        self._set_state(ModelState.UNLOADING, reason)
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        except TimeoutError:
            log.warning(
                "model '%s': %d requests still in flight after %.0fs; stopping anyway",
                self.name, self.in_flight, self.settings.drain_timeout,
            )  # fmt: skip
        replicas, self.replicas = self.replicas, []
        await asyncio.gather(*(w.stop(timeout=10) for w in replicas))
        self.metrics.replicas.labels(self.name).set(0)
        self._set_state(ModelState.UNAVAILABLE, reason)

    def _set_state(self, state: ModelState, reason: str) -> None:
        self.state = state
        self.reason = reason
        if state is ModelState.READY:
            self._ready.set()
        else:
            self._ready.clear()
            if state is not ModelState.LOADING:
                # Wake waiters so they see the model is not coming back.
                self._ready.set()
                self._ready = asyncio.Event()

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ------------------------------------------------------------------------

    async def call(self, kind: int, parts: list[bytes], reject_if_busy: bool = False) -> Response:
        """Send one request to the least busy replica and wait for its answer."""
        if self.in_flight >= self._queue_limit:
            raise ModelBusy(
                f"model '{self.name}' has {self.in_flight} requests queued, its limit "
                f"(scaling.max_queue_size); try again shortly"
            )
        replicas = self.replicas
        if replicas and self.state is ModelState.READY:
            worker = replicas[0] if len(replicas) == 1 else min(replicas, key=_load_of)
            if reject_if_busy and self.in_flight >= self._target * len(replicas):
                raise ModelBusy(f"model '{self.name}' is busy and the request asked not to wait")
        else:
            if reject_if_busy:
                raise ModelBusy(
                    f"model '{self.name}' is starting and the request asked not to wait"
                )
            worker = await self._wait_for_replica()
        channel = worker.channel
        assert channel is not None
        self.in_flight += 1
        self._idle.clear()
        try:
            return await channel.request(kind, parts)
        except WorkerGone:
            returncode = await _returncode_soon(worker)
            raise ModelUnavailable(
                f"model '{self.name}': worker pid {worker.pid} {worker.exit_reason(returncode)} "
                "while serving this request; it is restarting"
            ) from None
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _wait_for_replica(self) -> WorkerProcess:
        if self.state in (ModelState.UNAVAILABLE, ModelState.UNLOADING):
            raise ModelUnavailable(f"model '{self.name}' is unavailable: {self.reason}", 5)
        self.in_flight += 1
        try:
            await asyncio.wait_for(self._ready.wait(), self.settings.load_timeout)
        except TimeoutError:
            raise ModelUnavailable(
                f"model '{self.name}' did not become ready within "
                f"{self.settings.load_timeout:.0f}s",
                5,
            ) from None
        finally:
            self.in_flight -= 1
        if self.state is not ModelState.READY or not self.replicas:
            raise ModelUnavailable(f"model '{self.name}' is unavailable: {self.reason}", 5)
        return min(self.replicas, key=_load_of)


def _check_heartbeat(
    model: ModelDeployment, worker: WorkerProcess, now: float, timeout: float
) -> None:
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


def _exceeds_node(spec: ModelSpec) -> str:
    """Why the model cannot run here at all, or "" if it fits the node's memory."""
    available = node_memory_bytes()
    if available and spec.resources.memory > available:
        return (
            f"model '{spec.name}' (package {spec.package_dir}) asks for "
            f"{format_size(spec.resources.memory)} of memory but this node has "
            f"{format_size(available)}; lower resources.memory in omni.toml"
        )
    return ""


def _load_of(worker: WorkerProcess) -> int:
    return worker.channel.in_flight if worker.channel else 1 << 30


async def _returncode_soon(worker: WorkerProcess) -> int | None:
    if worker.process is None:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(worker.process.wait()), 2.0)
    except TimeoutError:
        return None


class Node:
    """Every model this runtime serves, and the packages that failed discovery."""

    def __init__(
        self,
        discovery: Discovery,
        settings: ServerSettings,
        metrics: Metrics,
        isolation: Isolation | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.isolation = isolation or Isolation()
        self.models = {
            spec.name: ModelDeployment(spec, settings, metrics, self.isolation)
            for spec in discovery.models
        }
        self.failures: list[PackageFailure] = discovery.failures
        self._watchdog: asyncio.Future[None] | None = None

    async def load_all(self) -> None:
        self._watchdog = asyncio.ensure_future(self._watch_heartbeats())
        await asyncio.gather(*(m.load() for m in self.models.values()))

    async def _watch_heartbeats(self) -> None:
        """Kill workers that owe an answer and have said nothing for heartbeat_timeout."""
        timeout = self.settings.heartbeat_timeout
        interval = max(0.05, min(5.0, timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for model in self.models.values():
                for worker in list(model.replicas):
                    try:
                        _check_heartbeat(model, worker, now, timeout)
                    except Exception:  # one odd worker must not end the watch for all
                        log.exception("heartbeat check of model '%s' failed", model.name)

    async def unload_all(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(m.unload("runtime shutting down") for m in self.models.values()))
        self.isolation.close()

    @property
    def ready(self) -> bool:
        return all(m.state is ModelState.READY for m in self.models.values())
