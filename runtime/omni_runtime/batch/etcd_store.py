"""A fleet's batch queue: ``AsyncBatchStore`` on the fleet's etcd, shared by every node.

    /omni/batch-index/open/<id>        {"model", "created", "total", "node"}: a batch with items
                                       left ("submitting": true while its items are written)
    /omni/batch-index/finished/<id>    the same with "finished", "done" and "failed"
    /omni/batches/<id>/input/<i>       item i's input, the model's /ai/run JSON
    /omni/batches/<id>/ref/<i>         its external_reference, when it has one
    /omni/batches/<id>/queued/<i>      how many times it was claimed; there until its outcome is
    /omni/batches/<id>/running/<i>     who runs it, {"node", "attempts"}: bound to that node's lease
    /omni/batches/<id>/done/<i>        its result (JSON)
    /omni/batches/<id>/failed/<i>      its error (JSON)

An item is queued while it has a ``queued`` key and no ``running`` one. A claim is one
transaction per item: if ``queued/<i>`` is as the claimer read it and ``running/<i>`` is absent,
put ``running/<i>`` under the claimer's lease and count the attempt, so two nodes never both
claim an item; when a node dies its lease expires, its ``running`` keys vanish and its items are
queued again (at least once). Recording puts ``done/<i>`` or ``failed/<i>`` and deletes the
other two keys only while ``queued/<i>`` exists, so an item's first outcome is its only one.
The index keeps the hot path (which models have items, twice a second on every node) to the
unfinished batches and a few counting reads, never the items themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aetcd import rpc
from aetcd.utils import prefix_range_end

from omni_runtime.batch.store import BatchItem, BatchStatus, BatchStoreUnavailable
from omni_runtime.fleet import etcd
from omni_runtime.fleet.store import EtcdStore, Lease, LeaseExpired, StoreUnavailable

__all__ = ["LEASE_TTL", "MAX_ITEM_SIZE", "EtcdBatchStore"]

log = logging.getLogger("omni.batch")
T = TypeVar("T")

OPEN = "/omni/batch-index/open/"
FINISHED = "/omni/batch-index/finished/"
BATCHES = "/omni/batches/"
STATES = ("queued", "running", "done", "failed")

# etcd refuses a request over 1.5 MiB (--max-request-bytes) and a transaction of more than 128
# operations (--max-txn-ops) by default: an item (input or result) stays under MAX_ITEM_SIZE,
# and a submission is written in transactions of at most _TXN_BYTES and _TXN_OPS.
MAX_ITEM_SIZE = 1 << 20
_TXN_BYTES = 1 << 20
_TXN_OPS = 120
_PAGE = 256  # keys per read of a range (a read answers at most 64 MiB)
LEASE_TTL = 10  # seconds: a dead node's items are queued again within this
_SUBMIT_GRACE = 3600.0  # a submission still unfinished after this was cut short: removed
_FINISHED_EVERY = 10.0  # seconds between two tallies of finished batches (metrics only)


@dataclass(frozen=True)
class _Batch:
    id: str
    record: dict[str, Any]  # the index record

    @property
    def model(self) -> str:
        return str(self.record["model"])

    @property
    def created(self) -> float:
        return float(self.record["created"])

    def status(self, counts: dict[str, int]) -> BatchStatus:
        running = counts.get("running", 0)
        return BatchStatus(
            request_id=self.id,
            model=self.model,
            created=self.created,
            total=int(self.record["total"]),
            queued=counts.get("queued", 0) - running,  # a running item keeps its queued key
            running=running,
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
        )

    def finished_status(self) -> BatchStatus:
        done, failed = int(self.record["done"]), int(self.record["failed"])
        return self.status({"done": done, "failed": failed})


class EtcdBatchStore:
    """The batch queue of a fleet on its etcd (``EtcdStore``); ``node`` names this node in
    its claims. Claims are bound to a lease of ``ttl`` seconds that this store keeps alive."""

    shared: bool = True
    max_item_size: int | None = MAX_ITEM_SIZE

    def __init__(self, store: EtcdStore, node: str, ttl: int = LEASE_TTL) -> None:
        self.etcd = store
        self.node = node
        self.ttl = ttl
        self._lease: Lease | None = None
        self._granting = asyncio.Lock()
        self._keeping: asyncio.Task[None] | None = None
        self._claims: dict[tuple[str, int], int] = {}  # this node's claims: their revision
        self._finished_tally: tuple[float, dict[str, int]] = (-_FINISHED_EVERY, {})

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, model: str, items: list[tuple[bytes, str | None]]) -> str:
        batch_id = secrets.token_hex(16)
        record = {"model": model, "created": time.time(), "total": len(items), "node": self.node}
        chunks: list[list[Any]] = [[]]
        size = 0
        for index, (body, reference) in enumerate(items):
            ops = [
                _put(_key(batch_id, "input", index), body),
                _put(_key(batch_id, "queued", index), b"0"),
            ]
            if reference is not None:
                ops.append(_put(_key(batch_id, "ref", index), reference.encode()))
            item_size = len(body) + len((reference or "").encode())
            if chunks[-1] and (size + item_size > _TXN_BYTES or len(chunks[-1]) + 3 > _TXN_OPS):
                chunks.append([])
                size = 0
            chunks[-1] += ops
            size += item_size
        if len(chunks) == 1:  # one transaction: the batch appears whole
            await self._txn([], [*chunks[0], _put(OPEN + batch_id, _json(record))])
            return batch_id
        # Several: marked as being written until its last item is, so that no node runs a
        # part of it meanwhile, and a submission cut short is recognised and removed.
        await self._txn([], [_put(OPEN + batch_id, _json({**record, "submitting": True}))])
        for chunk in chunks:
            await self._txn([], chunk)
        await self._txn([], [_put(OPEN + batch_id, _json(record))])
        return batch_id

    # -- claiming ---------------------------------------------------------------------------

    async def claim(self, model: str, limit: int) -> list[BatchItem]:
        """Up to ``limit`` queued items of ``model``, oldest batch first, each claimed under
        this node's lease (an item another node claimed first is skipped)."""
        claimed: list[BatchItem] = []
        for batch in await self._open(model):
            if len(claimed) >= limit:
                break
            claimed += await self._claim_in(batch.id, model, limit - len(claimed))
        return claimed

    async def _claim_in(self, batch_id: str, model: str, wanted: int) -> list[BatchItem]:
        claimed: list[BatchItem] = []
        for _ in range(3):  # items other nodes took meanwhile are skipped: look again
            candidates = await self._candidates(batch_id, wanted - len(claimed))
            found = await asyncio.gather(
                *(self._claim_one(batch_id, model, *c) for c in candidates)
            )
            claimed += [item for item in found if item is not None]
            if len(claimed) == wanted or None not in found:
                break
        return claimed

    async def _candidates(self, batch_id: str, wanted: int) -> list[tuple[int, int, int]]:
        """Up to ``wanted`` queued items of the batch that no node runs, in order: (index,
        the revision of its queued key, its attempts)."""
        running = {_index(kv.key) async for kv in self._scan(_prefix(batch_id, "running"), True)}
        candidates: list[tuple[int, int, int]] = []
        queued = self._scan(_prefix(batch_id, "queued"), page=wanted + len(running))
        async with contextlib.aclosing(queued):
            async for kv in queued:
                if _index(kv.key) not in running:
                    candidates.append((_index(kv.key), kv.mod_revision, int(kv.value or b"0")))
                    if len(candidates) == wanted:
                        break
        return candidates

    async def _claim_one(
        self, batch_id: str, model: str, index: int, revision: int, attempts: int
    ) -> BatchItem | None:
        queued, running = _key(batch_id, "queued", index), _key(batch_id, "running", index)
        claim = _json({"node": self.node, "attempts": attempts + 1})
        for _ in range(2):  # once more under a new lease if this node's has just expired
            lease = await self._lease_now()
            try:
                reply = await self._txn(
                    [_mod_is(queued, revision), _absent(running)],
                    [
                        _put(running, claim, lease.id),
                        _put(queued, str(attempts + 1).encode()),
                        _get(_key(batch_id, "input", index)),
                    ],
                )
            except LeaseExpired:
                self._lapsed(lease)
                continue
            if not reply.succeeded:
                return None  # another node claimed it first, or it was recorded meanwhile
            self._claims[(batch_id, index)] = reply.header.revision
            body = bytes(reply.responses[2].response_range.kvs[0].value)
            return BatchItem(batch_id, index, model, body, attempts + 1)
        return None

    async def release(self, items: list[BatchItem], attempted: bool = True) -> None:
        """Put this node's claimed items back in the queue; ``attempted=False``: the claim
        does not count against them. An item whose claim lapsed meanwhile is left as it is."""

        async def one(item: BatchItem) -> None:
            revision = self._claims.pop((item.batch_id, item.index), None)
            if revision is None:
                return
            running = _key(item.batch_id, "running", item.index)
            ops = [_delete(running)]
            if not attempted:
                ops.append(
                    _put(_key(item.batch_id, "queued", item.index), b"%d" % (item.attempts - 1))
                )
            await self._txn([_mod_is(running, revision)], ops)

        await asyncio.gather(*(one(item) for item in items))

    # -- recording --------------------------------------------------------------------------

    async def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool:
        """The item's outcome, kept only if it has none yet; True if it was recorded. A result
        larger than ``MAX_ITEM_SIZE`` is recorded as an error saying so."""
        value = _json(outcome)
        if len(value) > MAX_ITEM_SIZE:
            success, value = (
                False,
                _json(
                    {
                        "code": 3006,
                        "message": f"the item's result is {len(value)} bytes, larger than the "
                        f"fleet's limit of {MAX_ITEM_SIZE} bytes per batch item",
                    }
                ),
            )
        queued = _key(batch_id, "queued", index)
        reply = await self._txn(
            [_exists(queued)],
            [
                _delete(queued),
                _delete(_key(batch_id, "running", index)),
                _put(_key(batch_id, "done" if success else "failed", index), value),
            ],
        )
        self._claims.pop((batch_id, index), None)
        if reply.succeeded:
            await self._finish_if_done(batch_id)
        return bool(reply.succeeded)

    async def _finish_if_done(self, batch_id: str) -> None:
        """Move the batch to the finished index once no item is left (whoever records last,
        or the next survey if that node died in between)."""
        counts = [_count(_prefix(batch_id, state)) for state in ("queued", "done", "failed")]
        reply = await self._txn([], [*counts, _get(OPEN + batch_id)])
        queued, done, failed = (r.response_range.count for r in reply.responses[:3])
        found = reply.responses[3].response_range.kvs
        if queued or not found:
            return
        record = {**json.loads(found[0].value), "finished": time.time()}
        record.update(done=done, failed=failed)
        record.pop("submitting", None)
        await self._txn(
            [_mod_is(OPEN + batch_id, found[0].mod_revision)],
            [_delete(OPEN + batch_id), _put(FINISHED + batch_id, _json(record))],
        )

    # -- reading ----------------------------------------------------------------------------

    async def status(self, batch_id: str) -> BatchStatus | None:
        counts = [_count(_prefix(batch_id, state)) for state in STATES]
        reply = await self._txn([], [_get(OPEN + batch_id), _get(FINISHED + batch_id), *counts])
        opened, finished = (r.response_range.kvs for r in reply.responses[:2])
        if finished:
            return _batch(finished[0]).finished_status()
        if not opened or json.loads(opened[0].value).get("submitting"):
            return None
        tally = {
            s: r.response_range.count for s, r in zip(STATES, reply.responses[2:], strict=True)
        }
        return _batch(opened[0]).status(tally)

    async def results(self, batch_id: str) -> list[dict[str, Any]]:
        """One entry per item, in submission order."""
        reply = await self._txn([], [_get(OPEN + batch_id), _get(FINISHED + batch_id)])
        found = [kv for r in reply.responses for kv in r.response_range.kvs]
        if not found:
            return []
        total = int(json.loads(found[0].value)["total"])
        references: dict[int, str] = {}
        async for kv in self._scan(_prefix(batch_id, "ref")):
            references[_index(kv.key)] = bytes(kv.value).decode()
        outcomes: dict[int, tuple[bool, Any]] = {}
        for state in ("done", "failed"):
            async for kv in self._scan(_prefix(batch_id, state)):
                outcomes[_index(kv.key)] = (state == "done", json.loads(kv.value))
        results = []
        for index in range(total):
            success, value = outcomes.get(index, (False, None))
            entry: dict[str, Any] = {"id": index, "success": success}
            if success:
                entry["result"] = value
            else:
                entry["result"] = None
                entry["error"] = value
            entry["external_reference"] = references.get(index)
            results.append(entry)
        return results

    async def batches(self) -> list[BatchStatus]:
        opened = await self._open()
        tallies = await self._tallies([b.id for b in opened], STATES)
        found = [b.status(tallies[b.id]) for b in opened]
        found += [_batch(kv).finished_status() async for kv in self._scan(FINISHED)]
        return sorted(found, key=lambda s: (s.created, s.request_id))

    async def queued_models(self) -> dict[str, int]:
        """Models with queued items in the fleet, and how many."""
        opened = await self._open()
        tallies = await self._tallies([b.id for b in opened], ("queued", "running"))
        queued: dict[str, int] = {}
        for batch in opened:
            waiting = tallies[batch.id]["queued"] - tallies[batch.id]["running"]
            if waiting > 0:
                queued[batch.model] = queued.get(batch.model, 0) + waiting
            elif not tallies[batch.id]["queued"]:  # all recorded, but never moved: move it
                await self._finish_if_done(batch.id)
        return queued

    async def counts(self) -> dict[str, int]:
        """Items by state in the fleet (finished batches tallied every ``_FINISHED_EVERY``)."""
        opened = await self._open()
        tallies = await self._tallies([b.id for b in opened], STATES)
        statuses = [b.status(tallies[b.id]) for b in opened]
        counted_at, finished = self._finished_tally
        if time.monotonic() - counted_at >= _FINISHED_EVERY:
            finished = {"done": 0, "failed": 0}
            async for kv in self._scan(FINISHED):
                record = json.loads(kv.value)
                finished["done"] += int(record["done"])
                finished["failed"] += int(record["failed"])
            self._finished_tally = (time.monotonic(), finished)
        return {
            "queued": sum(s.queued for s in statuses),
            "running": sum(s.running for s in statuses),
            "done": sum(s.done for s in statuses) + finished.get("done", 0),
            "failed": sum(s.failed for s in statuses) + finished.get("failed", 0),
        }

    # -- retention and closing ----------------------------------------------------------------

    async def expire(self, now: float, retention: float) -> int:
        """Remove batches finished more than ``retention`` seconds ago, and submissions cut
        short (their node died while writing them); how many went."""
        gone: list[tuple[str, str, int]] = []  # index prefix, id, its record's revision
        async for kv in self._scan(FINISHED):
            if float(json.loads(kv.value)["finished"]) < now - retention:
                gone.append((FINISHED, _id(kv.key), kv.mod_revision))
        async for kv in self._scan(OPEN):
            record = json.loads(kv.value)
            if record.get("submitting") and float(record["created"]) < now - _SUBMIT_GRACE:
                gone.append((OPEN, _id(kv.key), kv.mod_revision))
        removed = 0
        for index, batch_id, revision in gone:
            reply = await self._txn(
                [_mod_is(index + batch_id, revision)],
                [_delete(index + batch_id), _delete(BATCHES + batch_id + "/", prefix=True)],
            )
            removed += bool(reply.succeeded)
        return removed

    async def close(self) -> None:
        """Stop keeping the lease alive and revoke it: the items this node still holds are
        queued again at once. (The etcd connection belongs to the fleet node.)"""
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
        if self._lease is not None:
            with contextlib.suppress(Exception):  # it expires by itself otherwise
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            self._lease = None

    # -- the lease --------------------------------------------------------------------------

    async def _lease_now(self) -> Lease:
        async with self._granting:
            if self._lease is None:
                self._lease = await self._call(lambda: self.etcd.lease(self.ttl))
                self._keeping = asyncio.create_task(self._keep_alive(self._lease))
            return self._lease

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
                self._lapsed(lease)
                return

    def _lapsed(self, lease: Lease) -> None:
        if self._lease is lease:
            log.warning(
                "batch: node %s's claims lapsed (lease %x expired while etcd was away): its "
                "items are queued again; claiming under a new lease",
                self.node, lease.id,
            )  # fmt: skip
            self._lease = None

    # -- talking to etcd ----------------------------------------------------------------------

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except StoreUnavailable as exc:
            raise BatchStoreUnavailable(
                f"the fleet's batch queue cannot be reached: {exc}"
            ) from exc

    async def _txn(self, compare: list[Any], ops: list[Any]) -> Any:
        return await self._call(lambda: self.etcd.txn(compare, ops))

    async def _scan(
        self, prefix: str, keys_only: bool = False, page: int = _PAGE
    ) -> AsyncGenerator[Any, None]:
        """Every key under ``prefix`` in key order, read ``page`` at a time, all at the
        revision of the first read."""
        start, end = etcd.encode_key(prefix), prefix_range_end(etcd.encode_key(prefix))
        revision = 0
        while True:
            request = rpc.RangeRequest(
                key=start, range_end=end, limit=page, keys_only=keys_only, revision=revision
            )
            reply = await self._txn([], [rpc.RequestOp(request_range=request)])
            found = reply.responses[0].response_range
            for kv in found.kvs:
                yield kv
            if not found.more or not found.kvs:
                return
            revision = revision or reply.header.revision
            start = bytes(found.kvs[-1].key) + b"\0"

    async def _open(self, model: str | None = None) -> list[_Batch]:
        """The unfinished batches (of ``model``), oldest first; none being submitted."""
        found = [_batch(kv) async for kv in self._scan(OPEN)]
        return sorted(
            (b for b in found if not b.record.get("submitting") and model in (None, b.model)),
            key=lambda b: (b.created, b.id),
        )

    async def _tallies(
        self, batch_ids: list[str], states: tuple[str, ...]
    ) -> dict[str, dict[str, int]]:
        """How many keys each batch has in each of ``states``, counted by etcd."""
        pairs = [(batch_id, state) for batch_id in batch_ids for state in states]
        tallies: dict[str, dict[str, int]] = {batch_id: {} for batch_id in batch_ids}
        for start in range(0, len(pairs), _TXN_OPS):
            chunk = pairs[start : start + _TXN_OPS]
            reply = await self._txn([], [_count(_prefix(b, s)) for b, s in chunk])
            for (batch_id, state), response in zip(chunk, reply.responses, strict=True):
                tallies[batch_id][state] = response.response_range.count
        return tallies


# -- keys and etcd's messages -------------------------------------------------------------------


def _prefix(batch_id: str, state: str) -> str:
    return f"{BATCHES}{batch_id}/{state}/"


def _key(batch_id: str, state: str, index: int) -> str:
    return f"{BATCHES}{batch_id}/{state}/{index:08d}"


def _index(key: bytes) -> int:
    return int(bytes(key).rpartition(b"/")[2])


def _id(key: bytes) -> str:
    return etcd.decode_key(key).rpartition("/")[2]


def _batch(kv: Any) -> _Batch:
    return _Batch(_id(kv.key), json.loads(kv.value))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _put(key: str, value: bytes, lease: int = 0) -> Any:
    request = rpc.PutRequest(key=etcd.encode_key(key), value=value, lease=lease)
    return rpc.RequestOp(request_put=request)


def _get(key: str) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=etcd.encode_key(key)))


def _count(prefix: str) -> Any:
    key = etcd.encode_key(prefix)
    request = rpc.RangeRequest(key=key, range_end=prefix_range_end(key), count_only=True)
    return rpc.RequestOp(request_range=request)


def _delete(key: str, prefix: bool = False) -> Any:
    encoded = etcd.encode_key(key)
    end = prefix_range_end(encoded) if prefix else b""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=encoded, range_end=end))


def _compare(key: str, target: str, result: str, **value: int) -> Any:
    return rpc.Compare(
        key=etcd.encode_key(key),
        target=rpc.Compare.CompareTarget.Value(target),
        result=rpc.Compare.CompareResult.Value(result),
        **value,
    )


def _exists(key: str) -> Any:
    return _compare(key, "VERSION", "GREATER", version=0)


def _absent(key: str) -> Any:
    return _compare(key, "VERSION", "EQUAL", version=0)


def _mod_is(key: str, revision: int) -> Any:
    return _compare(key, "MOD", "EQUAL", mod_revision=revision)
