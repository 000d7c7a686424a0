"""A served model in the runtime: its replicas, its queue, and how a request reaches a replica.

A request takes a free slot on the least busy ready replica (ties go to the oldest, so surplus
replicas fall idle and can be stopped), or waits in the model's queue until a slot is handed to
it: when a replica finishes a request or a new one becomes ready. Replicas are started and
stopped only by the ``Controller``; this module never decides how many there are.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from omni_runtime.config import ServerSettings
from omni_runtime.discovery import ModelSpec
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler.backend import Clock, Response, Worker, WorkerGone
from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable, Priority, RequestQueue
from omni_runtime.scheduler.replica import Replica, pipelines, replica_capacity
from omni_runtime.scheduler.sequences import Sequences
from omni_runtime.scheduler.stats import ModelStats
from omni_runtime.scheduler.views import ACTIVE, ReplicaState

__all__ = ["ModelState", "ModelStats", "ServedModel"]

log = logging.getLogger("omni.scheduler")
PIPELINE_WINDOW = 0.002  # seconds of work a sync replica may hold beyond the running request
PIPELINE_MAX = 8


class ModelState(enum.StrEnum):
    """A model as the v2 repository index shows it."""

    READY = "READY"  # serves: now, or on demand after a start (scaled to zero)
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # unloaded by an operator, or its replica failed to load


class ServedModel:
    """The runtime's side of one model: replicas, queue, admission, statistics."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: ServerSettings,
        metrics: Metrics,
        wake: Callable[[], None],
        clock: Clock,
        key: str | None = None,
    ) -> None:
        self.spec = spec
        self.clock = clock
        # The controller's name for it: the model's, or "name@version" for a version being
        # rolled out beside the one that serves (``scheduler/rollout.py``).
        self.name = key or spec.name
        self.settings = settings
        self.metrics = metrics
        self._wake = wake  # asks the controller to reconsider now
        self.queue: RequestQueue[Replica] = RequestQueue(spec.scaling.max_queue_size)
        self.replicas: list[Replica] = []
        self.capacity = replica_capacity(spec)
        # A sync engine runs one request at a time. When its requests are fast, the round
        # trip to the runtime between two of them costs more than the engine itself, so a
        # replica is handed as many requests as it finishes within PIPELINE_WINDOW (at most
        # PIPELINE_MAX): none waits behind the others longer than that. An engine slower
        # than PIPELINE_WINDOW gets strictly one at a time, so a new replica takes over the
        # whole backlog.
        self._pipelines = pipelines(spec)
        self.service_seconds = 1.0  # running mean of one request's engine time; "slow" at first
        self.in_flight = 0
        self.arrived = 0  # since the controller last looked
        self.recent_requests = 0  # over the stable window, as the controller counts them
        self.stats = ModelStats()
        self.wanted = True  # False once an operator unloads it
        self.unloading = False
        self.failure = ""  # why its last start failed, until a start succeeds
        self.blocked = ""  # why a replica it needs does not fit, while that lasts
        self.closing = False  # the runtime is shutting down
        self.not_before = 0.0
        self.restarts = 0
        self.load_seconds = 0.0  # how long its last start took
        # What a new replica reserves: declared, until a replica measured what it holds.
        self.expected_host = spec.resources.memory
        self.expected_gpu = spec.resources.gpu_memory
        self.lifecycle = asyncio.Lock()  # one operator load or unload at a time
        self.changed = asyncio.Event()  # set whenever a replica becomes ready or a start fails
        self.successor: ServedModel | None = None  # the version that replaced it (rollout)
        self.sequences = Sequences(self, spec.sequence) if spec.sequence is not None else None

    # -- what the API shows --------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        if self.unloading:
            return ModelState.UNLOADING
        if not self.wanted or (self.failure and not self.ready_replicas):
            return ModelState.UNAVAILABLE  # (a failed one still tries again when asked)
        return ModelState.READY

    def backing_off(self) -> bool:
        """Its last start failed and the next try is not due yet: requests get 503 now."""
        return bool(self.failure) and self.clock() < self.not_before and not self.ready_replicas

    @property
    def ready_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.state is ReplicaState.READY)

    @property
    def reason(self) -> str:
        if self.unloading:
            return "unloading: waiting for requests in flight"
        if not self.wanted:
            return "unloaded"
        if self.failure and not self.ready_replicas:
            wait = self.not_before - self.clock()
            if wait > 0:
                return f"{self.failure}; trying again in {wait:.0f}s"
            return f"{self.failure}; it tries again on the next request"
        ready, parts = self.ready_replicas, []
        starting = sum(1 for r in self.replicas if r.state is ReplicaState.STARTING)
        parked = sum(1 for r in self.replicas if r.state is ReplicaState.PARKED)
        if ready:
            parts.append(f"{ready} replica{'s' if ready > 1 else ''} ready")
        if parked:
            parts.append(f"{parked} parked (memory on the host; woken by the next request)")
        if starting:
            parts.append(f"{starting} starting")
        if self.blocked:
            parts.append(f"waiting for memory: {self.blocked}")
        if not parts:
            return "scaled to zero: starts on the next request"
        return "; ".join(parts)

    def unavailable(self) -> ModelUnavailable:
        if self.closing:
            return ModelUnavailable(f"model '{self.name}' is unavailable: the runtime is stopping")
        retry_after = 5
        if self.backing_off():
            retry_after = max(1, math.ceil(self.not_before - self.clock()))
        return ModelUnavailable(f"model '{self.name}' is unavailable: {self.reason}", retry_after)

    # -- memory --------------------------------------------------------------------------

    def measure(self) -> None:
        """What each ready replica holds now replaces its reservation, and is what the next
        replica of the model reserves."""
        host_seen, gpu_seen = [], []
        for replica in self.replicas:
            if replica.state is not ReplicaState.READY:
                continue
            host = replica.worker.memory_bytes()
            if host:
                replica.host_bytes = host
                host_seen.append(host)
            gpu = replica.worker.gpu_memory_bytes()
            if gpu:
                replica.gpu_bytes = gpu
                gpu_seen.append(gpu)
        if host_seen:
            self.expected_host = max(host_seen)
        if gpu_seen:
            self.expected_gpu = max(gpu_seen)

    # -- requests ------------------------------------------------------------------------

    def call(
        self,
        kind: int,
        parts: list[bytes],
        reject_if_busy: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """Send one request to a replica with room, waiting in the queue for one if needed:
        ``await model.call(...)``, at once: a free replica's slot is taken by the call. (Not
        itself a coroutine: with a replica free, the request's coroutine is the send itself,
        one frame fewer on the hot path.) ``on_chunk`` gets each chunk of a streamed request.
        """
        if self.unloading or not self.wanted or self.closing or self.backing_off():
            raise self.unavailable()
        self.arrived += 1
        replica = None if self.queue else self._free_replica()
        if reject_if_busy and (replica is None or self._busy()):
            if not self.ready_replicas:
                raise ModelBusy(
                    f"model '{self.name}' has no replica ready (it is starting or scaled to "
                    "zero) and the request asked not to wait"
                )
            raise ModelBusy(f"model '{self.name}' is busy and the request asked not to wait")
        if replica is None:
            return self._queued(kind, parts, priority, on_chunk)
        self._reserve(replica)
        return self._send(replica, kind, parts, on_chunk)

    async def _queued(
        self,
        kind: int,
        parts: list[bytes],
        priority: Priority,
        on_chunk: Callable[[bytes], None] | None,
    ) -> Response:
        replica = await self._wait(priority)
        return await self._send(replica, kind, parts, on_chunk)

    def _busy(self) -> bool:
        """At or over its autoscaling target: rejectIfBusy requests are refused."""
        target = self.spec.scaling.target_ongoing_requests
        return self.in_flight + len(self.queue) >= target * self.ready_replicas

    def _free_replica(self) -> Replica | None:
        if self._pipelines:
            # A sync engine: the oldest replica with room. Its room is one request unless it
            # is fast, and then packing its pipeline costs fewer process wake-ups than
            # spreading the same requests over every replica.
            for replica in self.replicas:
                if replica.state is ReplicaState.READY and replica.in_flight < replica.capacity:
                    return replica
            return None
        best = None
        for replica in self.replicas:
            if replica.state is ReplicaState.READY and replica.in_flight < replica.capacity:
                if not replica.in_flight:
                    return replica  # the oldest idle one
                if best is None or replica.in_flight < best.in_flight:
                    best = replica
        return best

    async def _wait(self, priority: Priority) -> Replica:
        if len(self.queue) >= self.queue.limit:
            raise ModelBusy(
                f"model '{self.name}' has {len(self.queue)} requests queued, its limit "
                "(scaling.max_queue_size); try again shortly"
            )
        future = self.queue.push(priority)
        if not any(r.state in ACTIVE for r in self.replicas):
            self._wake()  # a cold start: no need to wait for the next tick
        timeout = self.settings.load_timeout
        waited = self.clock()
        handle = asyncio.get_running_loop().call_later(timeout, self._expire, future, timeout)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # the slot was handed over as we left
            raise
        finally:
            handle.cancel()
            self.stats.queue_count += 1
            self.stats.queue_ns += int((self.clock() - waited) * 1e9)

    def _expire(self, future: asyncio.Future[Replica], timeout: float) -> None:
        if future.done():
            return
        why = f"waiting for memory: {self.blocked}" if self.blocked else self.reason
        future.set_exception(
            ModelUnavailable(
                f"model '{self.name}' had no replica free for this request within "
                f"{timeout:.0f}s (server.load_timeout); {why}",
                5,
            )
        )

    def _reserve(self, replica: Replica) -> None:
        replica.in_flight += 1
        self.in_flight += 1
        replica.idle.clear()

    def _release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self.in_flight -= 1
        if not replica.in_flight:
            replica.idle_since = self.clock()
            replica.idle.set()
        self.hand_over(replica)

    def hand_over(self, replica: Replica) -> None:
        """Give the replica's free slots to requests waiting in the queue."""
        while (
            self.queue
            and replica.state is ReplicaState.READY
            and replica.in_flight < replica.capacity
        ):
            waiter = self.queue.pop()
            if waiter is None:
                return
            self._reserve(replica)
            waiter.set_result(replica)

    async def _send(
        self,
        replica: Replica,
        kind: int,
        parts: list[bytes],
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Response:
        worker = replica.worker
        settled: asyncio.Future[Response] | None = None  # set when the caller went away
        try:
            first = not replica.served
            sent = self.clock()
            future = worker.request(kind, parts, on_chunk)
            try:
                response = await future
            except asyncio.CancelledError:
                # The caller went away (a disconnect, a deadline), but the worker may be
                # running the request: it keeps its slot until the worker has answered.
                settled = worker.abandon(future)
                raise
            done = self.clock()
            replica.served += 1
            if first:
                self._first_response(replica, done - sent)
            elif self._pipelines:
                # Its service began when it was sent or when the one before it finished.
                took = done - max(sent, replica.last_done)
                self.service_seconds += 0.2 * (took - self.service_seconds)
                fits = int(PIPELINE_WINDOW / max(self.service_seconds, 1e-6))
                replica.capacity = max(1, min(PIPELINE_MAX, fits))
            replica.last_done = done
            return response
        except WorkerGone:
            if self.closing:
                raise self.unavailable() from None
            if replica.stop_reason is not None:
                raise ModelUnavailable(
                    f"model '{self.name}': replica {replica.id} was stopped while serving this "
                    f"request ({replica.stop_reason})"
                ) from None
            returncode = await _returncode_soon(worker)
            raise ModelUnavailable(
                f"model '{self.name}': worker pid {worker.pid} {worker.exit_reason(returncode)} "
                "while serving this request; a new replica starts while the model has traffic"
            ) from None
        finally:
            if settled is None or settled.done():
                self._release(replica)
            else:
                settled.add_done_callback(lambda answer: self._settled(answer, replica))

    def _settled(self, answer: asyncio.Future[Response], replica: Replica) -> None:
        """The worker answered a request whose caller left (or ended): its slot is free."""
        if not answer.cancelled():
            answer.exception()  # nobody waits for it: read, so asyncio does not report it
        self._release(replica)

    def _first_response(self, replica: Replica, seconds: float) -> None:
        self.metrics.cold_start.labels(*self.labels, "first_response").observe(seconds)
        t = replica.worker.timings
        log.info(
            "model '%s': cold start of replica %d took %.3fs (spawn %.3fs, import %.3fs, "
            "load %.3fs, first response %.3fs)",
            self.name, replica.id, t.total + seconds, t.spawn, t.import_, t.load, seconds,
        )  # fmt: skip

    @property
    def labels(self) -> tuple[str, str]:
        """Its metrics' ``model`` and ``version`` labels (the plain name, for every version)."""
        return self.spec.name, self.spec.version

    def fail_waiting(self, error: Exception) -> None:
        self.queue.fail_all(error)

    def touch(self) -> None:
        """Count as a request: the autoscaler wants a replica for ``idle_timeout``."""
        self.arrived += 1
        self._wake()


async def _returncode_soon(worker: Worker) -> int | None:
    if worker.pid is None:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(worker.wait())), 2.0)
    except TimeoutError:
        return None
