"""This node's membership of the fleet: its record in etcd, bound to a lease it keeps alive.

The record (``/omni/nodes/<node>``: name, URL, zone, draining, started) lives as long as the
lease: ``TTL`` seconds after the node stops renewing it, etcd removes it. The node renews
every third of the TTL, with jitter so that many nodes do not renew in step. A node whose lease
expired (the store was away longer than the TTL) registers again with a new one; a store that
cannot be reached is retried for as long as it takes. The node never exits for any of this:
it goes on serving what it has, and its peers go on routing on their reports of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from typing import Any, Protocol

from omni_runtime.fleet.peers import NODES, NodeRecord

__all__ = ["TTL", "Membership"]

log = logging.getLogger("omni.fleet")

TTL = 10  # seconds


class _Lease(Protocol):
    id: int

    async def refresh(self) -> bool: ...
    async def revoke(self) -> None: ...


class _Store(Protocol):
    async def put(self, key: str, value: bytes, lease: Any = None) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def lease(self, ttl: int) -> Any: ...


class Membership:
    def __init__(self, store: _Store, record: NodeRecord, ttl: int = TTL) -> None:
        self.store = store
        self.record = record
        self.ttl = ttl
        self._lease: _Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    @property
    def key(self) -> str:
        return NODES + self.record.name

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def drain(self) -> None:
        """Tell the fleet this node takes no new work (it finishes what it has)."""
        self.record = dataclasses.replace(self.record, draining=True)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self.store.put(self.key, self.record.to_json(), self._lease)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(Exception):  # it expires by itself otherwise
                await asyncio.wait_for(self._lease.revoke(), 2.0)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                if self._lease is None:
                    lease = await self.store.lease(self.ttl)
                    await self.store.put(self.key, self.record.to_json(), lease)
                    self._lease = lease
                    self.registered.set()
                    log.info("fleet: node %s registered (lease %x, %ds)", self.record.name,
                             lease.id, self.ttl)  # fmt: skip
                elif not await self._lease.refresh():
                    log.warning("fleet: node %s's lease expired; registering again",
                                self.record.name)  # fmt: skip
                    self._lease = None
                    continue
                if failing:
                    log.info("fleet: the store answers again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: keep serving, keep trying
                if not failing:
                    log.warning("fleet: cannot reach the store (%s); trying again", exc)
                failing = True
                await asyncio.sleep(1.0 + random.random())
                continue
            await asyncio.sleep(self.ttl / 3 * random.uniform(0.8, 1.0))
