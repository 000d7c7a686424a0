"""What the front ends may do with the node's models, and nothing more.

The HTTP, gRPC, ``/v1`` and batch surfaces know a model by its name and reach it through a
``ModelHandle``: call it (or stream from it), read its state and reason, describe it, read its
statistics. They never see its replicas, its queue or the controller. ``ModelDirectory`` is the
node as they see it: the handles by name, whether the node is ready, the packages that failed,
and the operator's load and unload.

Request accounting lives here, in ``ModelHandle.call``, which every request passes whatever
its protocol: Triton's statistics (``ModelStats``) and the Prometheus request counters and
durations are counted once, with the status the model answered (429 when its queue is full,
503 when it is unavailable, 499 when the caller went away first). Outcomes a surface decides
before any call (a body too large, an input refused before a cold start) go through
``ModelHandle.account``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable, Priority
from omni_runtime.scheduler.trace import TRACE, answered_by
from omni_runtime.scheduler.views import ReplicaState

if TYPE_CHECKING:
    from omni_runtime.config import ServerSettings
    from omni_runtime.discovery import ModelSpec, PackageFailure
    from omni_runtime.metrics import Metrics
    from omni_runtime.scheduler.backend import Response
    from omni_runtime.scheduler.controller import Controller
    from omni_runtime.scheduler.models import ModelState, ServedModel
    from omni_runtime.scheduler.stats import ModelStats

__all__ = ["ModelDirectory", "ModelHandle"]

CLIENT_GONE = 499  # nginx's code for a request whose client closed the connection first


class ModelHandle:
    """One model as a front end sees it."""

    __slots__ = ("__weakref__", "_metrics", "_model", "_version", "name", "spec", "version_header")

    def __init__(self, model: ServedModel) -> None:
        self._model = model
        self._metrics = model.metrics
        self.name = model.spec.name
        self._version = model.spec.version  # its metrics' version label
        self.spec: ModelSpec = model.spec  # what ``describe`` routes show
        self.version_header = (b"omni-model-version", model.spec.version.encode())

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        return self._model.state

    @property
    def reason(self) -> str:
        return self._model.reason

    @property
    def ready_replicas(self) -> int:
        return self._model.ready_replicas

    @property
    def stopping(self) -> bool:
        """The runtime is shutting down: what fails now may work on another node or later."""
        return self._model.closing

    @property
    def stats(self) -> ModelStats:
        return self._model.stats

    def load(self) -> dict[str, int]:
        """How busy it is now, as the fleet's routers read it: ``warm`` replicas ready,
        ``room`` free slots on them, ``queued`` requests waiting, ``queue_room`` left."""
        model = self._model
        room = sum(
            max(0, r.capacity - r.in_flight)
            for r in model.replicas
            if r.state is ReplicaState.READY
        )
        queued = len(model.queue)
        return {
            "warm": model.ready_replicas,
            "room": room,
            "queued": queued,
            "queue_room": max(0, model.queue.limit - queued),
        }

    # -- requests ------------------------------------------------------------------------

    async def call(
        self,
        kind: int,
        parts: list[bytes],
        reject_if_busy: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        on_chunk: Callable[[bytes], None] | None = None,
        started: float | None = None,
    ) -> Response:
        """One request to the model (``ServedModel.call``), counted once however it ends.

        ``started`` is when the request arrived (``time.perf_counter()``), so that reading its
        body counts in its duration; by default, now.
        """
        if started is None:
            started = time.perf_counter()
        status = 500
        model = self._model
        version = self._version
        if model.successor is not None:  # held across a rollout: the version now serving
            while model.successor is not None:
                model = model.successor
            version = model.spec.version
            answered_by(version)  # the answer names the version that gave it
        try:
            if model.sequences is not None:  # a stateful model: the sequence's replica
                response = await model.sequences.call(kind, parts, priority, on_chunk)
            else:
                response = await model.call(kind, parts, reject_if_busy, priority, on_chunk)
            status = response[0]
        except ModelBusy:
            status = 429
            raise
        except ModelUnavailable:
            status = 503
            raise
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            self.account(status, started, version)
        return response

    def account(self, status: int, started: float, version: str | None = None) -> None:
        """Count one answer the model did not give itself (e.g. a body refused unread);
        ``version``: the version that gave it, when not this handle's."""
        elapsed = time.perf_counter() - started
        stats = self._model.stats
        stats.record(status == 200, int(elapsed * 1e9))
        if status >= 500:
            stats.server_errors += 1
        stats.latencies.append(elapsed)
        self._metrics.observe(self.name, version or self._version, status, elapsed)

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r})"


class SplitHandle(ModelHandle):
    """A model while a new version is tried beside the current one: ``percent`` of its
    requests go to the new version, spread evenly (every fifth at 20 %), the rest to the
    current one. Everything else (state, description, statistics) is the current one's."""

    __slots__ = ("_credit", "candidate", "current", "percent")

    def __init__(self, current: ModelHandle, candidate: ModelHandle, percent: float) -> None:
        self.current = current
        self.candidate = candidate
        self.percent = percent
        self._credit = 0.0
        self._model = current._model
        self._metrics = current._metrics
        self._version = current._version
        self.name = current.name
        self.spec = current.spec
        self.version_header = current.version_header

    def choose(self) -> ModelHandle:
        self._credit += self.percent
        if self._credit >= 100.0:
            self._credit -= 100.0
            return self.candidate
        return self.current

    async def call(
        self,
        kind: int,
        parts: list[bytes],
        reject_if_busy: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        on_chunk: Callable[[bytes], None] | None = None,
        started: float | None = None,
    ) -> Response:
        chosen = self.choose()
        trace = TRACE.get()
        if trace is not None:  # the answer names the version that gave it
            trace.version = chosen.spec.version
        return await chosen.call(kind, parts, reject_if_busy, priority, on_chunk, started)


class ModelDirectory:
    """The node's models by name, as the front ends see them."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._handles: dict[str, ModelHandle] = {}
        self._splits: dict[str, SplitHandle] = {}
        self._changes = 0

    def get(self, name: str) -> ModelHandle | None:
        split = self._splits.get(name)
        if split is not None:
            return split
        return self._handle(name)

    def _handle(self, name: str) -> ModelHandle | None:
        model = self._controller.models.get(name)
        if model is None:
            return None
        handle = self._handles.get(name)
        if handle is None or handle._model is not model:
            handle = self._handles[name] = ModelHandle(model)
        return handle

    def __contains__(self, name: object) -> bool:
        return name in self._controller.models

    def __iter__(self) -> Iterator[ModelHandle]:
        for name in list(self._controller.models):
            handle = self.get(name)
            if handle is not None:
                yield handle

    def names(self) -> list[str]:
        return sorted(self._controller.models)

    @property
    def generation(self) -> int:
        """Changes whenever a model is added, removed, or split between versions: what a
        front end cached by name is stale."""
        return self._controller.generation + self._changes

    def version(self, name: str, version: str) -> ModelHandle | None:
        """The model ``name`` at ``version`` (the current one, or one being rolled out)."""
        for key, model in list(self._controller.models.items()):
            if model.spec.name == name and model.spec.version == version:
                return self._handle(key) if key == name else ModelHandle(model)
        return None

    def split(self, name: str, candidate: str, percent: float) -> None:
        """Send ``percent`` of ``name``'s requests to the model ``candidate`` (its new version);
        100 sends them all."""
        current = self._handle(name)
        if current is None:
            raise KeyError(name)
        new = ModelHandle(self._controller.models[candidate])
        self._splits[name] = SplitHandle(current, new, percent)
        self._changes += 1

    def unsplit(self, name: str) -> None:
        """Every request of ``name`` to the model known by that name again."""
        if self._splits.pop(name, None) is not None:
            self._changes += 1

    @property
    def ready(self) -> bool:
        """Every model that should be up is up (``/v2/health/ready``)."""
        return self._controller.ready

    @property
    def failures(self) -> list[PackageFailure]:
        """Packages found but not served, with why."""
        return self._controller.failures

    @property
    def settings(self) -> ServerSettings:
        return self._controller.settings

    @property
    def metrics(self) -> Metrics:
        return self._controller.metrics

    @property
    def isolation(self) -> str:
        """How worker processes are kept apart, in words (server metadata)."""
        return self._controller.backend.description

    async def load(self, handle: ModelHandle) -> str:
        """An operator's load: "" once a replica is ready, else why not."""
        return await self._controller.load(handle._model)

    async def unload(self, handle: ModelHandle) -> None:
        await self._controller.unload(handle._model)

    def configure(self, handle: ModelHandle, scaling: dict[str, Any]) -> None:
        """Change the model's scaling (a load request's configuration): the controller
        follows it from its next decision."""
        model = handle._model
        model.spec = dataclasses.replace(
            model.spec, scaling=model.spec.scaling.model_copy(update=scaling)
        )
        handle.spec = model.spec

    def free_memory(self) -> tuple[int, int]:
        """Host and device bytes no replica holds or has reserved: room for a cold start."""
        controller = self._controller
        host = controller.node.host_memory
        gpu = sum(controller.node.gpu_budgets.values())
        for model in controller.models.values():
            for replica in model.replicas:
                host -= replica.host_bytes
                gpu -= replica.gpu_bytes
        return max(0, host), max(0, gpu)
