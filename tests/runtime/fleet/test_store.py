"""The fleet's store on real etcd: keys, leases, watches, failover and outages."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest

from omni_runtime.config import ConfigError
from omni_runtime.fleet.store import (
    EtcdStore,
    LeaseExpired,
    StoreUnavailable,
    WatchEvent,
    catalog_key,
    node_key,
    parse_fleet_url,
)
from tests.fleet_etcd import EtcdCluster

PREFIX = "/omni/test/"


async def _next(watch: AsyncIterator[list[WatchEvent]], timeout: float = 20) -> list[WatchEvent]:
    return await asyncio.wait_for(anext(watch), timeout)


def _apply(view: dict[str, bytes], events: list[WatchEvent]) -> dict[str, bytes]:
    for event in events:
        if event.value is None:
            view.pop(event.key, None)
        else:
            view[event.key] = event.value
    return view


def test_keys_live_under_omni() -> None:
    assert catalog_key("@cf/baai/bge-small-en-v1.5") == "/omni/catalog/@cf/baai/bge-small-en-v1.5"
    assert node_key("gpu-7") == "/omni/nodes/gpu-7"


def test_a_fleet_url_lists_its_endpoints() -> None:
    assert parse_fleet_url("etcd://127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_fleet_url("etcd://a:1, b.example:2,[::1]:3/") == [
        ("a", 1),
        ("b.example", 2),
        ("::1", 3),
    ]


@pytest.mark.parametrize(
    "url", ["http://h:2379", "etcd://", "etcd://h", "etcd://h:0", "etcd://h:port", "h:2379"]
)
def test_a_wrong_fleet_url_is_refused_naming_it(url: str) -> None:
    with pytest.raises(ConfigError, match="etcd://HOST:PORT") as error:
        parse_fleet_url(url)
    assert repr(url) in str(error.value)


def test_get_put_delete_and_items(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        try:
            assert await store.get(PREFIX + "a") is None
            await store.put(PREFIX + "a", b"1")
            await store.put(PREFIX + "b/@c", b"2")
            await store.put("/omni/other", b"3")
            assert await store.get(PREFIX + "a") == b"1"
            assert await store.items(PREFIX) == {PREFIX + "a": b"1", PREFIX + "b/@c": b"2"}
            await store.put(PREFIX + "a", b"4")
            assert await store.get(PREFIX + "a") == b"4"
            assert await store.delete(PREFIX + "a") is True
            assert await store.delete(PREFIX + "a") is False
            assert await store.get(PREFIX + "a") is None
            assert await store.items(PREFIX) == {PREFIX + "b/@c": b"2"}
            assert await store.items("/omni/nothing/") == {}
        finally:
            await store.close()

    asyncio.run(run())


def test_a_lease_that_is_not_refreshed_expires_with_its_keys(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        try:
            lease = await store.lease(2)
            assert lease.ttl >= 2
            await store.put(PREFIX + "node", b"up", lease)
            for _ in range(3):  # refreshed, it outlives its TTL
                await asyncio.sleep(1)
                assert await lease.refresh() is True
            assert await store.get(PREFIX + "node") == b"up"
            deadline = time.monotonic() + 10
            while await store.get(PREFIX + "node") is not None:
                assert time.monotonic() < deadline, "the lease's key outlived it"
                await asyncio.sleep(0.2)
            assert await lease.refresh() is False
            with pytest.raises(LeaseExpired, match="grant a new lease"):
                await store.put(PREFIX + "node", b"up", lease)
        finally:
            await store.close()

    asyncio.run(run())


def test_a_revoked_lease_takes_its_keys_at_once(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        try:
            lease = await store.lease(60)
            await store.put(PREFIX + "node", b"up", lease)
            await lease.revoke()
            assert await store.get(PREFIX + "node") is None
            await lease.revoke()  # again: nothing to do
            assert await lease.refresh() is False
        finally:
            await store.close()

    asyncio.run(run())


def test_a_watch_gives_a_snapshot_then_each_change(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        watch = store.watch(PREFIX)
        try:
            await store.put(PREFIX + "a", b"1")
            await store.put(PREFIX + "b", b"2")
            assert await _next(watch) == [
                WatchEvent("put", PREFIX + "a", b"1"),
                WatchEvent("put", PREFIX + "b", b"2"),
            ]
            await store.put("/omni/elsewhere", b"x")  # not under the prefix: not seen
            await store.put(PREFIX + "a", b"3")
            assert await _next(watch) == [WatchEvent("put", PREFIX + "a", b"3")]
            await store.delete(PREFIX + "b")
            assert await _next(watch) == [WatchEvent("delete", PREFIX + "b", None)]
            lease = await store.lease(60)
            await store.put(PREFIX + "c", b"4", lease)
            assert await _next(watch) == [WatchEvent("put", PREFIX + "c", b"4")]
            await lease.revoke()
            assert await _next(watch) == [WatchEvent("delete", PREFIX + "c", None)]
        finally:
            await watch.aclose()
            await store.close()

    asyncio.run(run())


def test_an_empty_prefix_gives_an_empty_snapshot(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        watch = store.watch(PREFIX)
        try:
            assert await _next(watch) == []
            await store.put(PREFIX + "a", b"1")
            assert await _next(watch) == [WatchEvent("put", PREFIX + "a", b"1")]
        finally:
            await watch.aclose()
            await store.close()

    asyncio.run(run())


def test_closing_the_store_ends_its_watches(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        watch = store.watch(PREFIX)
        assert await _next(watch) == []
        waiting = asyncio.create_task(_next(watch))
        await asyncio.sleep(0.2)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await waiting
        with pytest.raises(RuntimeError, match="the store is closed"):
            await store.get(PREFIX)

    asyncio.run(run())


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_losing_the_member_in_use_changes_nothing(etcd3: EtcdCluster, role: str) -> None:
    leader = etcd3.leader()
    lost = leader if role == "leader" else (leader + 1) % 3
    endpoints = etcd3.endpoints
    endpoints.insert(0, endpoints.pop(lost))  # the store starts on the member that goes

    async def run() -> None:
        store = await EtcdStore.connect(endpoints)
        assert store.endpoint == etcd3.endpoints[lost]
        watch = store.watch(PREFIX)
        try:
            await store.put(PREFIX + "a", b"1")
            lease = await store.lease(30)
            await store.put(PREFIX + "node", b"up", lease)
            view = _apply({}, await _next(watch))
            etcd3.kill(lost)
            await store.put(PREFIX + "b", b"2")
            assert store.endpoint != etcd3.endpoints[lost]
            assert await store.get(PREFIX + "a") == b"1"
            assert await store.delete(PREFIX + "a") is True
            assert await lease.refresh() is True
            expected = {PREFIX + "b": b"2", PREFIX + "node": b"up"}
            assert await store.items(PREFIX) == expected
            while view != expected:  # the open watch goes on, on another member
                _apply(view, await _next(watch))
            await store.put(PREFIX + "c", b"3")
            assert _apply(view, await _next(watch)) == expected | {PREFIX + "c": b"3"}
        finally:
            await watch.aclose()
            await store.close()

    asyncio.run(run())


def test_a_watch_waits_out_an_outage_and_reports_what_vanished(
    etcd3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omni.fleet")

    async def run() -> None:
        writer = await EtcdStore.connect(etcd3.endpoints[1:])
        watcher = await EtcdStore.connect(etcd3.endpoints[:1], timeout=1)  # m0 only
        watch = watcher.watch(PREFIX)
        try:
            await writer.put(PREFIX + "a", b"1")
            await writer.put(PREFIX + "b", b"2")
            assert len(await _next(watch)) == 2
            waiting = asyncio.create_task(_next(watch, timeout=60))
            etcd3.kill(0)
            await writer.delete(PREFIX + "a")
            await writer.put(PREFIX + "c", b"3")
            while not any(r.levelno == logging.WARNING for r in caplog.records):
                assert not waiting.done(), waiting
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # a few more tries, still no answer
            await asyncio.to_thread(etcd3.restart, 0)
            assert await waiting == [
                WatchEvent("delete", PREFIX + "a", None),
                WatchEvent("put", PREFIX + "b", b"2"),
                WatchEvent("put", PREFIX + "c", b"3"),
            ]
            await writer.put(PREFIX + "d", b"4")
            assert await _next(watch) == [WatchEvent("put", PREFIX + "d", b"4")]
        finally:
            await watch.aclose()
            await watcher.close()
            await writer.close()

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert PREFIX in warnings[0] and etcd3.url.split(",")[0].removeprefix("etcd://") in warnings[0]
    back = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(back) == 1, caplog.text


def test_no_endpoint_answering_raises_store_unavailable_naming_them() -> None:
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections are taken by the kernel, never answered
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        endpoints = [silent.getsockname(), closed.getsockname()]

        async def run() -> None:
            await EtcdStore.connect(endpoints, timeout=0.5)

        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as error:
            asyncio.run(run())
        assert time.monotonic() - started < 5
    message = str(error.value)
    for host, port in endpoints:
        assert f"{host}:{port}" in message
    assert "no answer within 0.5s" in message
    assert error.value.endpoints == endpoints


def test_an_operation_raises_store_unavailable_once_every_member_is_gone(
    etcd: EtcdCluster,
) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints, timeout=0.5)
        try:
            etcd.kill(0)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=etcd.url.removeprefix("etcd://")):
                await store.put(PREFIX + "a", b"1")
            assert time.monotonic() - started < 3
        finally:
            await store.close()

    asyncio.run(run())
