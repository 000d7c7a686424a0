"""The lease a node's batch claims are bound to: while the node lives it keeps the lease
alive; when it dies (or loses etcd for longer than the lease's time to live) its claims vanish
with the lease, and the items they held are queued again for another node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from omni_runtime.fleet.store import EtcdStore, Lease

__all__ = ["ClaimLease"]

log = logging.getLogger("omni.batch")


class ClaimLease:
    def __init__(
        self,
        store: EtcdStore,
        node: str,
        ttl: int,
        call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self._call = call  # how the batch store talks to etcd (its errors, its way)
        self._lease: Lease | None = None
        self._granting = asyncio.Lock()
        self._keeping: asyncio.Task[None] | None = None

    async def get(self) -> Lease:
        """The lease to claim under: granted on first use, kept alive from then on."""
        async with self._granting:
            if self._lease is None:
                lease: Lease = await self._call(lambda: self.store.lease(self.ttl))
                self._lease = lease
                self._keeping = asyncio.create_task(self._keep_alive(lease))
            return self._lease

    def lapsed(self, lease: Lease) -> None:
        """``lease`` expired: the next claim is made under a new one."""
        if self._lease is lease:
            log.warning(
                "batch: node %s's claims lapsed (lease %x expired while etcd was away): its "
                "items are queued again; claiming under a new lease",
                self.node, lease.id,
            )  # fmt: skip
            self._lease = None

    async def close(self) -> None:
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
        if self._lease is not None:
            with contextlib.suppress(Exception):  # it expires by itself otherwise
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            self._lease = None

    async def _keep_alive(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(lease.ttl / 3 * random.uniform(0.8, 1.0))
            try:
                alive = await lease.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd is away: if it stays away, the lease lapses
                log.debug("batch: cannot refresh lease %x: %s", lease.id, exc)
                continue
            if not alive:
                self.lapsed(lease)
                return
