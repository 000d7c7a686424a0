"""Sending each request to a node of the fleet that can take it.

``FleetDirectory`` stands where the node's own ``ModelDirectory`` stands for the front ends,
so every protocol (v2 HTTP and gRPC, ``/ai/run`` with streaming, ``/v1``) is routed the same
way, through ``RoutedHandle.call``:

1. here, if the model is warm here with room in its queue (or the request has made its hops);
2. else a peer with the model warm and room: least queued first, same zone first;
3. else the node with the most free memory for a cold start, here included, chosen at random
   among the best three so that many routers do not all pick the same node;
4. a peer that refuses the connection or dies before answering is skipped, and the next one is
   tried within the same request (a stream only until its first chunk arrived).

A request travels at most ``MAX_HOPS`` forwards; ``Omni-Route`` carries the nodes it passed,
``Omni-Node`` the node that answered.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omni_runtime.config import ServerSettings
from omni_runtime.discovery import ModelSpec
from omni_runtime.fleet.forward import Forwarder, PeerUnreachable
from omni_runtime.fleet.peers import PeerReport, Peers
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import (
    ModelBusy,
    ModelDirectory,
    ModelHandle,
    ModelState,
    ModelStats,
    ModelUnavailable,
    Priority,
)
from omni_runtime.scheduler.trace import TRACE, Trace
from omni_sdk import Resources, Scaling

__all__ = ["MAX_HOPS", "FleetDirectory", "RoutedHandle", "spec_from_record"]

log = logging.getLogger("omni.fleet")

MAX_HOPS = 2
ATTEMPTS = 3  # nodes tried for one request before it fails
SHORT_LIST = 3  # cold starts go to one of the best this many, at random
Response = tuple[int, int, bytes]


class RoutedHandle(ModelHandle):
    """A model of the fleet: served here when that is best, else forwarded to a peer."""

    __slots__ = ("_directory", "_local", "_stats")

    def __init__(
        self, name: str, spec: ModelSpec, local: ModelHandle | None, directory: FleetDirectory
    ) -> None:
        self.name = name
        self.spec = spec
        self.version_header = (b"omni-model-version", spec.version.encode())
        self._local = local
        self._directory = directory
        self._stats = ModelStats()

    # -- state: this node's, and the fleet's where it has no replica of its own ----------

    def _remote(self) -> list[PeerReport]:
        return [r for r in self._directory.peers.routable() if self.name in r.models]

    @property
    def state(self) -> ModelState:
        if self._local is not None:
            return self._local.state
        return ModelState.READY if self._remote() else ModelState.UNAVAILABLE

    @property
    def reason(self) -> str:
        remote = self._remote()
        where = f"; on {len(remote)} other node(s) of the fleet" if remote else ""
        if self._local is not None:
            return self._local.reason + where
        return f"served by the fleet{where}" if remote else "no node of the fleet serves it now"

    @property
    def ready_replicas(self) -> int:
        here = self._local.ready_replicas if self._local is not None else 0
        return here + sum(r.models[self.name].get("warm", 0) for r in self._remote())

    @property
    def stopping(self) -> bool:
        return self._local.stopping if self._local is not None else False

    @property
    def stats(self) -> ModelStats:
        return self._local.stats if self._local is not None else self._stats

    def load(self) -> dict[str, int]:
        if self._local is None:
            return {"warm": 0, "room": 0, "queued": 0, "queue_room": 0}
        return self._local.load()

    def account(self, status: int, started: float, version: str | None = None) -> None:
        if self._local is not None:
            self._local.account(status, started, version)
            return
        elapsed = time.perf_counter() - started
        self._stats.record(status == 200, int(elapsed * 1e9))
        self._directory.metrics.observe(self.name, version or self.spec.version, status, elapsed)

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
        trace = TRACE.get() or Trace()
        local = self._local
        if local is not None and (trace.nodes or self._warm_here(local)):
            # Warm here, or forwarded here: a forwarder chose this node for it.
            return await local.call(kind, parts, reject_if_busy, priority, on_chunk, started)
        if started is None:
            started = time.perf_counter()
        tried = {*trace.nodes, self._directory.me}
        if len(trace.nodes) >= MAX_HOPS:
            raise ModelUnavailable(
                f"model '{self.name}': not served by node {self._directory.me}, and the request "
                f"already passed {len(trace.nodes)} nodes ({', '.join(trace.nodes)})"
            )
        failures: list[str] = []
        for peer in self._directory.choose(self.name, tried, local is not None)[:ATTEMPTS]:
            if peer is None:
                assert local is not None
                return await local.call(kind, parts, reject_if_busy, priority, on_chunk, started)
            try:
                response = await self._directory.forwarder.forward(
                    peer, self.name, kind, parts, reject_if_busy, priority, on_chunk, trace,
                    functools.partial(self._directory.peers.fresh, peer.node.name),
                )  # fmt: skip
            except PeerUnreachable as exc:
                failures.append(f"{peer.node.name}: {exc}")
                log.warning("fleet: model '%s': node %s: %s; trying the next", self.name,
                            peer.node.name, exc)  # fmt: skip
                continue
            except ModelBusy:
                self._forwarded(429, started)
                raise
            except ModelUnavailable:
                self._forwarded(503, started)
                raise
            self._forwarded(response[0], started)
            return response
        if local is not None:
            return await local.call(kind, parts, reject_if_busy, priority, on_chunk, started)
        self._forwarded(503, started)
        why = "; ".join(failures) or "no node with it has a fresh load report"
        raise ModelUnavailable(f"model '{self.name}': no node of the fleet can take it now ({why})")

    def _forwarded(self, status: int, started: float) -> None:
        """Count a forwarded request here only where this node has no replica of its own
        (a router): otherwise the node that served it counts it, once."""
        if self._local is None:
            self.account(status, started)

    def _warm_here(self, local: ModelHandle) -> bool:
        load = local.load()
        return bool(load["warm"]) and load["queue_room"] > 0


class FleetDirectory(ModelDirectory):
    """The models of this node and of the fleet, as the front ends see them."""

    def __init__(
        self,
        me: str,
        zone: str,
        local: ModelDirectory | None,
        peers: Peers,
        settings: ServerSettings,
        metrics: Metrics,
    ) -> None:
        self.me = me
        self.zone = zone
        self.local = local
        self.peers = peers
        self._settings = settings
        self._metrics = metrics
        self._routed: dict[str, RoutedHandle] = {}
        self.forwarder = Forwarder(me, dict(peers.client.headers))

    # -- the directory -------------------------------------------------------------------

    def get(self, name: str) -> ModelHandle | None:
        local = self.local.get(name) if self.local is not None else None
        routed = self._routed.get(name)
        if local is not None:
            if routed is not None and routed._local is local:
                return routed
            spec = local.spec
        else:
            described = next(
                (r.specs[name] for r in self.peers.routable() if name in r.specs), None
            )
            if described is None:  # no node runs it (any more)
                self._routed.pop(name, None)
                return None
            if routed is not None and routed._local is None:
                return routed
            spec = spec_from_record(described)
        routed = self._routed[name] = RoutedHandle(name, spec, local, self)
        return routed

    def _names(self) -> set[str]:
        names = set(self.local.names()) if self.local is not None else set()
        for report in self.peers.routable():
            names.update(report.models)
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[ModelHandle]:
        for name in sorted(self._names()):
            handle = self.get(name)
            if handle is not None:
                yield handle

    def names(self) -> list[str]:
        return sorted(self._names())

    def version(self, name: str, version: str) -> ModelHandle | None:
        return self.local.version(name, version) if self.local is not None else None

    @property
    def generation(self) -> int:
        here = self.local.generation if self.local is not None else 0
        return here + self.peers.generation  # both only grow

    @property
    def ready(self) -> bool:
        return self.local.ready if self.local is not None else bool(self.peers.routable())

    @property
    def failures(self) -> list[Any]:
        return self.local.failures if self.local is not None else []

    @property
    def settings(self) -> ServerSettings:
        return self._settings

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def isolation(self) -> str:
        return self.local.isolation if self.local is not None else "none: this node only routes"

    async def load(self, handle: ModelHandle) -> str:
        local = getattr(handle, "_local", None)
        if self.local is None or local is None:
            return f"model '{handle.name}' has no replica on node {self.me}; load it on its nodes"
        return await self.local.load(local)

    async def unload(self, handle: ModelHandle) -> None:
        local = getattr(handle, "_local", None)
        if self.local is not None and local is not None:
            await self.local.unload(local)

    def configure(self, handle: ModelHandle, scaling: dict[str, Any]) -> None:
        local = getattr(handle, "_local", None)
        if self.local is not None and local is not None:
            self.local.configure(local, scaling)

    def free_memory(self) -> tuple[int, int]:
        return self.local.free_memory() if self.local is not None else (0, 0)

    # -- routing -------------------------------------------------------------------------

    def choose(self, name: str, tried: set[str], here: bool) -> list[PeerReport | None]:
        """The nodes to try for ``name``, best first; None stands for this node."""
        reports = [r for r in self.peers.routable() if r.node.name not in tried]
        warm, cold = [], []
        for report in reports:
            load = report.models.get(name)
            if load is None:
                continue
            if load.get("warm", 0) and load.get("queue_room", 0) > 0:
                warm.append(report)
            elif load.get("queue_room", 1) > 0:
                cold.append(report)
        # Same zone first, then the least queued: what it reported waiting, plus what this
        # node sent it since (fresher than any report); ties at random, so that routers
        # reading the same reports do not all pick the same node.
        outstanding = self.forwarder.outstanding
        warm.sort(
            key=lambda r: (
                r.node.zone != self.zone,
                r.models[name].get("queued", 0) + outstanding.get(r.node.name, 0),
                random.random(),
            )
        )
        # A cold start under way (requests this node sent there, or queued there as the
        # last report said) takes the burst that follows it: one start, not one per node.
        starting = self.forwarder.starting
        started: list[PeerReport | None] = [
            r for r in cold
            if starting.get((r.node.name, name)) or r.models[name].get("queued", 0)
        ]  # fmt: skip
        cold = [r for r in cold if r not in started]
        choices: list[tuple[int, PeerReport | None]] = [(r.host_free, r) for r in cold]
        local = self.local.get(name) if here and self.local is not None else None
        if local is not None and local.load()["queued"]:
            started.insert(0, None)  # starting here already
        elif here:
            choices.append((self.free_memory()[0], None))
        choices.sort(key=lambda choice: -choice[0])
        short = [node for _, node in choices[:SHORT_LIST]]
        random.shuffle(short)
        return [*warm, *started, *short, *(node for _, node in choices[SHORT_LIST:])]

    async def close(self) -> None:
        await self.forwarder.close()


def spec_from_record(record: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        name=record["name"],
        task=record.get("task", ""),
        description=record.get("description", ""),
        package=record.get("package", ""),
        package_dir=Path(record.get("path", ".")),
        python="",
        engine_class="(on another node)",
        inputs=record.get("inputs", []),
        outputs=record.get("outputs", []),
        input_schema=record.get("input_schema", {}),
        output_schema=record.get("output_schema", {}),
        resources=Resources.model_validate(record.get("resources", {})),
        scaling=Scaling.model_validate(record.get("scaling", {})),
        max_batch_size=int(record.get("max_batch_size", 0)),
        batch_dimension=record.get("batch_dimension") is True,
        device=str(record.get("device", "cpu")),
        is_async=bool(record.get("is_async")),
        streaming=bool(record.get("streaming")),
        input_schema_exact=bool(record.get("input_schema_exact")),
        version=str(record.get("version") or "1"),
    )
