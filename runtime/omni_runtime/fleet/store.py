"""The fleet's store: etcd v3, keys under ``/omni/``, reached through any of its endpoints.

    /omni/catalog/<model>   the model's CatalogEntry (JSON)
    /omni/nodes/<node>      the node's record (JSON), bound to the node's lease

``Store`` is what the catalog, membership and the router use; ``EtcdStore`` is it on etcd
(the asyncio client ``aetcd``), with failover: an operation whose endpoint does not answer is
tried again on the next one, so losing one member of a cluster changes nothing for callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import aetcd
import grpc

from omni_runtime.config import ConfigError
from omni_runtime.fleet import etcd

__all__ = [
    "PREFIX",
    "EtcdStore",
    "Lease",
    "LeaseExpired",
    "Store",
    "StoreUnavailable",
    "WatchEvent",
    "catalog_key",
    "node_key",
    "parse_fleet_url",
]

PREFIX = "/omni/"
CATALOG_PREFIX = PREFIX + "catalog/"
NODES_PREFIX = PREFIX + "nodes/"
URL_FORM = "etcd://HOST:PORT[,HOST:PORT...]"

log = logging.getLogger("omni.fleet")
T = TypeVar("T")


def catalog_key(model: str) -> str:
    """``/omni/catalog/<model>``; the name is kept whole (``@cf/baai/bge-small-en-v1.5``)."""
    return CATALOG_PREFIX + model


def node_key(node: str) -> str:
    """``/omni/nodes/<node>``."""
    return NODES_PREFIX + node


_HOST = re.compile(r"[A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.%]+\]")


def parse_fleet_url(url: str) -> list[tuple[str, int]]:
    """``etcd://h1:2379,h2:2379`` as ``[("h1", 2379), ("h2", 2379)]``; ``ConfigError`` naming
    the URL when it is not one."""

    def wrong(why: str) -> ConfigError:
        return ConfigError(f"fleet URL {url!r}: {why}; write it as {URL_FORM}")

    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() != "etcd":
        raise wrong("the scheme must be etcd://")
    endpoints: list[tuple[str, int]] = []
    for part in rest.rstrip("/").split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not _HOST.fullmatch(host):
            raise wrong(f"{part.strip()!r} is not HOST:PORT")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise wrong(f"{part.strip()!r} needs a port from 1 to 65535")
        if (host.strip("[]"), int(port)) not in endpoints:
            endpoints.append((host.strip("[]"), int(port)))
    return endpoints


@dataclass(frozen=True)
class WatchEvent:
    """A key put (``value``: its new value) or deleted (``value``: None)."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None


class StoreUnavailable(Exception):
    """No endpoint of the store answered; the message lists the endpoints tried."""

    def __init__(self, endpoints: list[tuple[str, int]], reasons: str) -> None:
        self.endpoints = list(endpoints)
        tried = ", ".join(etcd.address(e) for e in endpoints)
        super().__init__(
            f"no etcd endpoint answered (tried {tried}): {reasons}; check that etcd runs "
            "there and that this machine reaches it"
        )


class LeaseExpired(Exception):
    """A put named a lease that has expired (or was revoked): grant a new one and put again."""


class Lease:
    """A granted lease: the keys put with it vanish ``ttl`` seconds after its last refresh.

    ``Store.lease`` grants one; each store returns its own subclass, which does the work.
    """

    def __init__(self, id: int, ttl: int) -> None:
        self.id = id
        self.ttl = ttl

    async def refresh(self) -> bool:
        """Keep it alive once more; False when it has expired (its keys are gone)."""
        raise NotImplementedError

    async def revoke(self) -> None:
        """End it now: its keys are deleted. Revoking an expired lease does nothing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id:#x}, ttl={self.ttl})"


class Store(Protocol):
    """Keys (str) to values (bytes), leases and watches: what the fleet keeps in etcd."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None: ...

    async def delete(self, key: str) -> bool: ...

    async def items(self, prefix: str) -> dict[str, bytes]: ...

    async def lease(self, ttl: int) -> Lease: ...

    def watch(self, prefix: str) -> AsyncIterator[list[WatchEvent]]:
        """First a snapshot (every key under ``prefix`` as a "put"), then each change as it
        happens. After a lost connection: "delete" for the keys that vanished meanwhile and a
        fresh snapshot, so the consumer's view is right after each yield. An outage is retried
        for ever, never raised."""
        ...

    async def close(self) -> None: ...


_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0  # a watch's backoff while no endpoint answers (seconds)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _EtcdLease(Lease):
    def __init__(self, id: int, ttl: int, store: EtcdStore) -> None:
        super().__init__(id, ttl)
        self._store = store

    async def refresh(self) -> bool:
        reply = await self._store._call(lambda client: client.refresh_lease(self.id))
        return reply is not None and reply.TTL > 0

    async def revoke(self) -> None:
        try:
            await self._store._call(lambda client: client.revoke_lease(self.id))
        except aetcd.ClientError as exc:
            if "lease not found" not in str(exc):
                raise


class EtcdStore(Store):
    """The store on an etcd v3 cluster, through whichever of its endpoints answers.

    One aetcd client per endpoint; operations go to the current one. When it does not answer
    (refused, gone, no leader, or nothing within ``timeout``), the operation moves on to the
    next endpoint, which becomes the current one; ``StoreUnavailable`` when none answered.
    """

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError(f"EtcdStore needs at least one endpoint ({URL_FORM})")
        self._endpoints = list(endpoints)
        self._timeout = timeout
        self._clients: dict[int, Any] = {}  # endpoint index -> aetcd.Client
        self._current = 0
        self._answered: set[int] = set()  # endpoints whose last operation got an answer
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: list[tuple[str, int]], timeout: float = 2.0) -> EtcdStore:
        """A store whose cluster has answered a read; ``StoreUnavailable`` when none did."""
        store = cls(endpoints, timeout)
        try:
            await store.get(PREFIX)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return list(self._endpoints)

    @property
    def endpoint(self) -> tuple[str, int]:
        """The endpoint operations go to now."""
        return self._endpoints[self._current]

    # -- the operations -----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        found = await self._call(lambda client: client.get(etcd.encode_key(key)))
        return None if found is None else bytes(found.value)

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        lease_id = 0 if lease is None else lease.id
        try:
            await self._call(lambda client: client.put(etcd.encode_key(key), value, lease=lease_id))
        except aetcd.ClientError as exc:
            if lease is not None and "lease not found" in str(exc):
                raise LeaseExpired(
                    f"cannot put {key}: {lease!r} has expired; grant a new lease and put again"
                ) from None
            raise

    async def delete(self, key: str) -> bool:
        return await self._call(lambda client: client.delete(etcd.encode_key(key))) is not None

    async def items(self, prefix: str) -> dict[str, bytes]:
        return (await self._range(prefix))[0]

    async def lease(self, ttl: int) -> Lease:
        granted = await self._call(lambda client: client.lease(ttl))
        return _EtcdLease(granted.id, granted.ttl, self)

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> Any:
        """One etcd transaction in etcd's own terms: ``aetcd.rpc`` ``Compare`` and ``RequestOp``
        messages in, its ``TxnResponse`` out (ranges with limits, counts and revisions, which
        the batch queue's claims need). ``LeaseExpired`` when a put names an expired lease."""
        request = aetcd.rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)
        )

        async def run(client: Any) -> Any:
            await client.connect()
            return await client.kvstub.Txn(request, timeout=self._timeout, metadata=client.metadata)

        try:
            return await self._call(run)
        except grpc.aio.AioRpcError as exc:
            if "lease not found" in str(exc.details()):
                raise LeaseExpired(
                    f"a transaction named an expired lease: {exc.details()}"
                ) from None
            raise

    async def close(self) -> None:
        """Close the connections; open watches end."""
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()

    async def _range(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix``, and the store's revision they were read at."""
        found = await self._call(lambda client: client.get_prefix(etcd.encode_key(prefix)))
        return {etcd.decode_key(kv.key): bytes(kv.value) for kv in found.kvs}, found.header.revision

    # -- failover -----------------------------------------------------------------------------

    def _client(self, index: int) -> Any:
        client = self._clients.get(index)
        if client is None:
            client = self._clients[index] = etcd.client(self._endpoints[index], self._timeout)
        return client

    async def _call(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        return await self._call_at(lambda index: operation(self._client(index)))

    async def _call_at(self, operation: Callable[[int], Awaitable[T]]) -> T:
        """``operation`` on the current endpoint, then on each next one while they do not
        answer (each within ``timeout``)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        reasons = []
        start = self._current
        for step in range(len(self._endpoints)):
            index = (start + step) % len(self._endpoints)
            try:
                result = await asyncio.wait_for(operation(index), self._timeout)
            except asyncio.CancelledError:
                if self._closed and not _cancelling():  # close() ended the call
                    raise RuntimeError("the store is closed") from None
                raise
            except Exception as exc:
                if not etcd.connection_lost(exc) or self._closed:
                    raise
                reasons.append(
                    f"{etcd.address(self._endpoints[index])}: {etcd.reason(exc, self._timeout)}"
                )
                self._lost(index, exc)
                continue
            self._answered.add(index)
            return result
        raise StoreUnavailable(self._endpoints, "; ".join(reasons))

    def _lost(self, index: int, exc: BaseException) -> None:
        """Endpoint ``index`` did not answer: the next one becomes the current one."""
        if self._current == index:
            self._current = (index + 1) % len(self._endpoints)
        if index in self._answered:  # once per endpoint that stops answering
            self._answered.discard(index)
            log.info(
                "etcd at %s stopped answering (%s); now using %s",
                etcd.address(self._endpoints[index]),
                etcd.reason(exc, self._timeout),
                etcd.address(self._endpoints[self._current]),
            )

    # -- watches ------------------------------------------------------------------------------

    async def watch(self, prefix: str) -> AsyncIterator[list[WatchEvent]]:
        view: set[str] = set()  # the keys the consumer holds
        delay = _RETRY_FIRST
        outage = False
        while not self._closed:
            try:
                snapshot, revision = await self._range(prefix)
                index, call = await self._call_at(
                    functools.partial(self._start_watch, prefix=prefix, start_revision=revision + 1)
                )
            except RuntimeError:
                if self._closed:  # closed while it read
                    return
                raise
            except (StoreUnavailable, etcd.WatchLost, grpc.aio.AioRpcError) as exc:
                if self._closed:
                    return
                if not outage:
                    outage = True
                    log.warning("watch on %s: %s; retrying until it answers", prefix, exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _RETRY_MAX)
                continue
            if outage:
                log.info(
                    "watch on %s: etcd answers again (%s)", prefix, etcd.address(self.endpoint)
                )
            outage, delay = False, _RETRY_FIRST
            gone = [WatchEvent("delete", key, None) for key in sorted(view - snapshot.keys())]
            view = set(snapshot)
            try:
                yield gone + [WatchEvent("put", key, value) for key, value in snapshot.items()]
                while True:
                    events = [
                        WatchEvent("delete", key, None)
                        if value is None
                        else WatchEvent("put", key, value)
                        for key, value in await etcd.next_changes(call)
                    ]
                    for event in events:
                        if event.kind == "put":
                            view.add(event.key)
                        else:
                            view.discard(event.key)
                    yield events
            except asyncio.CancelledError:
                if self._closed and not _cancelling():  # close() ended the call: so ends the watch
                    return
                raise
            except (grpc.aio.AioRpcError, etcd.WatchLost) as exc:
                if self._closed:
                    return
                if isinstance(exc, etcd.WatchLost):
                    log.info("watch on %s: %s; reading it again", prefix, exc)
                else:
                    self._lost(index, exc)
            finally:
                call.cancel()

    async def _start_watch(self, index: int, prefix: str, start_revision: int) -> tuple[int, Any]:
        return index, await etcd.open_watch(self._client(index), prefix, start_revision)
