"""A fleet's batch queue on real etcd: submissions, claims that two nodes never share, claims
that lapse with their node's lease, idempotent recording, retention."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from omni_runtime.batch import BatchItem, BatchRunner, BatchStoreUnavailable
from omni_runtime.batch.etcd_store import MAX_ITEM_SIZE, EtcdBatchStore
from omni_runtime.batch.runner import COLD_DEFER, claim_limit
from omni_runtime.config import ServerSettings
from omni_runtime.fleet.store import EtcdStore
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import Controller
from omni_runtime.scheduler.simulated import Physics, SimulatedWorkers
from tests.fleet_etcd import EtcdCluster, etcd_fixture

etcd = etcd_fixture(1)


@asynccontextmanager
async def node(cluster: EtcdCluster, name: str, ttl: int = 10) -> AsyncIterator[EtcdBatchStore]:
    """A node's batch store over a connection of its own."""
    connection = await EtcdStore.connect(cluster.endpoints)
    store = EtcdBatchStore(connection, name, ttl)
    try:
        yield store
    finally:
        await store.close()
        await connection.close()


def run(cluster: EtcdCluster, scenario: Callable[[EtcdCluster], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(cluster), 60))


def test_items_are_claimed_oldest_first_and_recorded_once(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as store:
            first = await store.submit("m", [(b'{"x": 1}', "a"), (b'{"x": 2}', None)])
            second = await store.submit("m", [(b'{"x": 3}', None)])
            assert await store.queued_models() == {"m": 3}
            claimed = await store.claim("m", 2)
            assert [(i.batch_id, i.index, i.body, i.attempts) for i in claimed] == [
                (first, 0, b'{"x": 1}', 1),
                (first, 1, b'{"x": 2}', 1),
            ]
            assert await store.claim("other", 5) == []
            assert await store.queued_models() == {"m": 1}
            running = await store.status(first)
            assert running is not None and (running.running, running.queued) == (2, 0)
            assert await store.record(first, 0, True, {"y": 1})
            assert not await store.record(first, 0, False, {"message": "late"})  # first stays
            assert await store.record(first, 1, False, {"code": 5006, "message": "bad"})
            status = await store.status(first)
            assert status is not None and status.finished
            assert (status.total, status.done, status.failed) == (2, 1, 1)
            results = await store.results(first)
            assert results[0] == {
                "id": 0, "success": True, "result": {"y": 1}, "external_reference": "a"
            }  # fmt: skip
            assert results[1]["error"] == {"code": 5006, "message": "bad"}
            assert results[1]["result"] is None and results[1]["external_reference"] is None
            assert (await store.status(second)).status == "queued"  # type: ignore[union-attr]
            assert await store.status("nope") is None
            assert await store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1}
            listed = await store.batches()
            assert [b.request_id for b in listed] == [first, second]

    run(etcd, scenario)


def test_any_node_sees_every_batch(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a, node(cluster, "b") as b:
            batch = await a.submit("m", [(b"{}", "r")])
            assert (await b.status(batch)) == (await a.status(batch))
            [item] = await b.claim("m", 5)
            assert await b.record(item.batch_id, item.index, True, {"ok": True})
            assert (await a.results(batch))[0]["result"] == {"ok": True}
            assert [s.request_id for s in await a.batches()] == [batch]

    run(etcd, scenario)


def test_two_nodes_claiming_at_once_never_get_the_same_item(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a, node(cluster, "b") as b:
            count = 120
            batch = await a.submit("m", [(b'{"i": %d}' % i, None) for i in range(count)])
            taken: dict[str, list[BatchItem]] = {"a": [], "b": []}

            async def claimer(store: EtcdBatchStore) -> None:
                while await store.queued_models():
                    taken[store.node] += await store.claim("m", 7)

            await asyncio.gather(*(claimer(s) for s in (a, b, a, b)))
            ours = [(i.batch_id, i.index) for i in taken["a"]]
            theirs = [(i.batch_id, i.index) for i in taken["b"]]
            assert ours and theirs  # both took part
            assert not set(ours) & set(theirs)
            assert sorted(ours + theirs) == [(batch, i) for i in range(count)]  # each once
            assert await a.queued_models() == {}

    run(etcd, scenario)


def test_a_node_whose_lease_expires_gives_its_items_back(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "b") as b:
            connection = await EtcdStore.connect(cluster.endpoints)
            a = EtcdBatchStore(connection, "a", ttl=2)
            batch = await a.submit("m", [(b"{}", None), (b"{}", None), (b"{}", None)])
            assert len(await a.claim("m", 2)) == 2
            assert await b.queued_models() == {"m": 1}
            await connection.close()  # node a is cut off: nothing renews its lease
            deadline = time.monotonic() + 20
            while (await b.queued_models()).get("m") != 3:
                assert time.monotonic() < deadline, "a's claims outlived its lease"
                await asyncio.sleep(0.2)
            again = await b.claim("m", 5)
            assert sorted((i.index, i.attempts) for i in again) == [(0, 2), (1, 2), (2, 1)]
            for item in again:
                await b.record(batch, item.index, True, {})
            status = await b.status(batch)
            assert status is not None and status.finished and status.done == 3
            await a.close()

    run(etcd, scenario)


def test_a_node_whose_claims_lapsed_claims_under_a_new_lease(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a:
            await a.submit("m", [(b"{}", None), (b"{}", None)])
            [first] = await a.claim("m", 1)
            lapsed = a.lease._lease
            assert lapsed is not None
            await lapsed.revoke()  # as when etcd was away for longer than the lease
            again = await a.claim("m", 5)  # its claim went with the lease: item 0 is back
            assert sorted((i.index, i.attempts) for i in again) == [(0, 2), (1, 1)]
            assert a.lease._lease is not None and a.lease._lease.id != lapsed.id
            assert (await a.status(first.batch_id)).running == 2  # type: ignore[union-attr]

    run(etcd, scenario)


def test_a_closed_node_gives_its_items_back_at_once(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a, node(cluster, "b") as b:
            await a.submit("m", [(b"{}", None), (b"{}", None)])
            assert len(await a.claim("m", 5)) == 2
            await a.close()  # the lease is revoked
            assert await b.queued_models() == {"m": 2}

    run(etcd, scenario)


def test_released_items_are_queued_again_with_or_without_the_attempt(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a, node(cluster, "b") as b:
            await a.submit("m", [(b"{}", None), (b"{}", None)])
            first, second = await a.claim("m", 2)
            await a.release([first])  # it ran and failed: the attempt counts
            await a.release([second], attempted=False)  # the model was busy: it does not
            again = await b.claim("m", 2)
            assert sorted((i.index, i.attempts) for i in again) == [(0, 2), (1, 1)]
            await a.release([first])  # no longer a's: nothing happens
            assert await a.queued_models() == {}

    run(etcd, scenario)


def test_a_batch_too_big_for_one_transaction_is_written_whole(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a:
            body = b'{"text": "%s"}' % (b"x" * 300_000)  # several per etcd request at most
            count = 60  # and more items than one transaction may hold
            items: list[tuple[bytes, str | None]] = [(body, None)] * 5
            items += [(b"{}", str(i)) for i in range(count)]
            batch = await a.submit("m", items)
            status = await a.status(batch)
            assert status is not None and status.total == 5 + count
            claimed = await a.claim("m", 100)
            assert [i.body for i in claimed[:5]] == [body] * 5 and len(claimed) == 5 + count
            for item in claimed:
                await a.record(batch, item.index, True, {"i": item.index})
            results = await a.results(batch)
            assert [r["result"] for r in results] == [{"i": i} for i in range(5 + count)]
            assert results[-1]["external_reference"] == str(count - 1)

    run(etcd, scenario)


def test_a_result_over_the_item_limit_is_recorded_as_an_error(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a:
            batch = await a.submit("m", [(b"{}", None)])
            [item] = await a.claim("m", 1)
            assert await a.record(batch, item.index, True, {"text": "x" * MAX_ITEM_SIZE})
            [result] = await a.results(batch)
            assert not result["success"] and "limit" in result["error"]["message"]

    run(etcd, scenario)


def test_finished_batches_expire_after_the_retention(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a:
            done = await a.submit("m", [(b"{}", None)])
            pending = await a.submit("m", [(b"{}", None), (b"{}", None)])
            [item] = await a.claim("m", 1)
            await a.record(done, item.index, True, {})
            assert await a.expire(time.time() + 10, retention=60) == 0
            assert await a.expire(time.time() + 120, retention=60) == 1
            assert await a.status(done) is None and await a.status(pending) is not None
            assert await a.results(done) == []
            assert await a.etcd.items(f"/omni/batches/{done}/") == {}
            assert len(await a.etcd.items(f"/omni/batches/{pending}/")) == 4

    run(etcd, scenario)


def test_an_unreachable_store_says_so() -> None:
    async def scenario() -> None:
        connection = EtcdStore([("127.0.0.1", 1)], timeout=0.5)
        store = EtcdBatchStore(connection, "a")
        with pytest.raises(BatchStoreUnavailable, match=re.escape("127.0.0.1:1")):
            await store.queued_models()
        await store.close()
        await connection.close()

    asyncio.run(scenario())


def test_claims_follow_idle_room() -> None:
    assert claim_limit(5, warm=True, waited=0.0, shared=True) == 5  # its free slots
    assert claim_limit(0, warm=True, waited=9.0, shared=True) == 0
    # a cold node leaves a fleet's items to warm ones for a moment, then starts the model
    assert claim_limit(1, warm=False, waited=0.0, shared=True) == 0
    assert claim_limit(1, warm=False, waited=COLD_DEFER, shared=True) == 1
    assert claim_limit(1, warm=False, waited=0.0, shared=False) == 1  # alone: at once


def test_a_node_never_claims_items_of_a_model_it_does_not_serve(etcd: EtcdCluster) -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        async with node(cluster, "a") as a, node(cluster, "b") as b:
            loop = asyncio.get_running_loop()
            backend = SimulatedWorkers(Physics(), [], loop.time, [])
            controller = Controller([], ServerSettings(), Metrics(), backend, host_memory=1 << 30)
            runner = BatchRunner(b, controller, 3600)  # b serves no model at all
            batch = await a.submit("@elsewhere/m", [(b"{}", None)])
            runner.start()
            await asyncio.sleep(1.5)  # three rounds of its dispatch loop
            assert runner.counts["queued"] == 1
            status = await a.status(batch)
            assert status is not None and status.queued == 1 and status.running == 0
            await runner.stop()

    run(etcd, scenario)
