"""The other nodes of the fleet, and what each can take now.

Who is in the fleet comes from etcd (``/omni/nodes/<node>``, each record bound to its node's
lease). What each node can take comes from the node itself: this node asks every peer for its
load report (``GET /fleet/capacity``) twice a second, so no request ever waits on etcd. A
report older than ``REPORT_TTL`` makes its node unroutable until the next one arrives: a node
killed with SIGKILL stops receiving requests within that time, long before its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

__all__ = ["REPORT_TTL", "NodeRecord", "PeerReport", "Peers"]

log = logging.getLogger("omni.fleet")

NODES = "/omni/nodes/"
REPORT_TTL = 2.0  # seconds a load report stays good
POLL_SECONDS = 0.5


class _WatchEvent(Protocol):
    kind: str
    key: str
    value: bytes | None


class _Store(Protocol):
    def watch(self, prefix: str) -> AsyncIterator[list[Any]]: ...


@dataclass(frozen=True)
class NodeRecord:
    """A member of the fleet, as it registered itself."""

    name: str
    url: str
    zone: str = ""
    draining: bool = False
    started: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeRecord:
        value = json.loads(data)
        return cls(
            name=str(value["name"]),
            url=str(value["url"]).rstrip("/"),
            zone=str(value.get("zone") or ""),
            draining=bool(value.get("draining")),
            started=float(value.get("started") or 0.0),
        )


@dataclass
class PeerReport:
    """One node's load report, and when it arrived (``time.monotonic()``)."""

    node: NodeRecord
    at: float
    draining: bool
    models: dict[str, dict[str, int]]  # name -> warm, room, queued, queue_room
    host_free: int
    gpu_free: int
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> description

    def fresh(self, now: float) -> bool:
        return now - self.at <= REPORT_TTL and not self.draining


class Peers:
    """The fleet's other nodes and their latest reports."""

    def __init__(self, store: _Store, me: str, token: str | None = None) -> None:
        self.store = store
        self.me = me
        self.nodes: dict[str, NodeRecord] = {}
        self.reports: dict[str, PeerReport] = {}
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(1.0),
            limits=httpx.Limits(max_keepalive_connections=64),
        )
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()  # the first view of the members arrived
        self.generation = 0  # changes when the models some peer runs change

    def start(self) -> None:
        self._watch = asyncio.create_task(self._follow())

    async def close(self) -> None:
        tasks = [t for t in [self._watch, *self._pollers.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.aclose()

    def fresh(self, name: str) -> bool:
        """Whether node ``name``'s last load report is recent enough to count on it."""
        report = self.reports.get(name)
        return report is not None and time.monotonic() - report.at <= REPORT_TTL

    def routable(self) -> list[PeerReport]:
        """Peers with a fresh report that are not draining."""
        now = time.monotonic()
        return [r for name, r in self.reports.items() if name in self.nodes and r.fresh(now)]

    # -- membership ----------------------------------------------------------------------

    async def _follow(self) -> None:
        async for events in self.store.watch(NODES):
            for event in events:
                name = event.key[len(NODES) :]
                if name == self.me:
                    continue
                if event.kind == "delete" or event.value is None:
                    self._forget(name)
                    continue
                try:
                    record = NodeRecord.from_json(event.value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "fleet: the record of node %r is not valid (%s); skipped", name, exc
                    )
                    continue
                self.nodes[name] = record
                if name not in self._pollers:
                    self._pollers[name] = asyncio.create_task(self._poll(name))
            self.synced.set()

    def _forget(self, name: str) -> None:
        self.nodes.pop(name, None)
        if self.reports.pop(name, None) is not None:
            self.generation += 1
        poller = self._pollers.pop(name, None)
        if poller is not None:
            poller.cancel()

    async def _poll(self, name: str) -> None:
        failing = False
        while name in self.nodes:
            record = self.nodes[name]
            try:
                response = await self.client.get(f"{record.url}/fleet/capacity")
                response.raise_for_status()
                report = _report(record, response.json())
                before = self.reports.get(name)
                if before is None or before.models.keys() != report.models.keys():
                    self.generation += 1
                self.reports[name] = report
                if failing:
                    log.info("fleet: node %s reports again", name)
                failing = False
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                if not failing:
                    log.warning("fleet: no load report from node %s (%s)", name, exc)
                failing = True
            await asyncio.sleep(POLL_SECONDS)


def _report(record: NodeRecord, value: dict[str, Any]) -> PeerReport:
    models = {
        str(name): {k: int(v) for k, v in load.items()} for name, load in value["models"].items()
    }
    return PeerReport(
        node=record,
        at=time.monotonic(),
        draining=bool(value.get("draining")),
        models=models,
        host_free=int(value.get("host_free", 0)),
        gpu_free=int(value.get("gpu_free", 0)),
        specs=dict(value.get("specs") or {}),
    )
