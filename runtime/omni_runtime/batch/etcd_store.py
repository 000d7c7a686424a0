"""A fleet's batch queue: ``AsyncBatchStore`` on the fleet's etcd, shared by every node.

The keys, and how claims and outcomes stay right across nodes, are described in
``etcd_keys``; the lease a node's claims are bound to is ``etcd_lease``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from aetcd import rpc
from aetcd.utils import prefix_range_end

from omni_runtime.batch import etcd_keys as keys
from omni_runtime.batch.etcd_lease import ClaimLease
from omni_runtime.batch.store import BatchItem, BatchStatus, BatchStoreUnavailable
from omni_runtime.fleet import etcd
from omni_runtime.fleet.store import EtcdStore, LeaseExpired, StoreUnavailable

__all__ = ["LEASE_TTL", "MAX_ITEM_SIZE", "EtcdBatchStore"]

log = logging.getLogger("omni.batch")
T = TypeVar("T")


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


class EtcdBatchStore:
    """The batch queue of a fleet on its etcd (``EtcdStore``); ``node`` names this node in
    its claims. Claims are bound to a lease of ``ttl`` seconds that this store keeps alive."""

    shared: bool = True
    max_item_size: int | None = MAX_ITEM_SIZE

    def __init__(self, store: EtcdStore, node: str, ttl: int = LEASE_TTL) -> None:
        self.etcd = store
        self.node = node
        self.ttl = ttl
        self.lease = ClaimLease(store, node, ttl, self._call)
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
                keys.put(keys.key(batch_id, "input", index), body),
                keys.put(keys.key(batch_id, "queued", index), b"0"),
            ]
            if reference is not None:
                ops.append(keys.put(keys.key(batch_id, "ref", index), reference.encode()))
            item_size = len(body) + len((reference or "").encode())
            if chunks[-1] and (size + item_size > _TXN_BYTES or len(chunks[-1]) + 3 > _TXN_OPS):
                chunks.append([])
                size = 0
            chunks[-1] += ops
            size += item_size
        if len(chunks) == 1:  # one transaction: the batch appears whole
            await self._txn([], [*chunks[0], keys.put(keys.OPEN + batch_id, keys.encoded(record))])
            return batch_id
        # Several: marked as being written until its last item is, so that no node runs a
        # part of it meanwhile, and a submission cut short is recognised and removed.
        await self._txn(
            [], [keys.put(keys.OPEN + batch_id, keys.encoded({**record, "submitting": True}))]
        )
        for chunk in chunks:
            await self._txn([], chunk)
        await self._txn([], [keys.put(keys.OPEN + batch_id, keys.encoded(record))])
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
        running = {
            keys.index(kv.key) async for kv in self._scan(keys.prefix(batch_id, "running"), True)
        }
        candidates: list[tuple[int, int, int]] = []
        queued = self._scan(keys.prefix(batch_id, "queued"), page=wanted + len(running))
        async with contextlib.aclosing(queued):
            async for kv in queued:
                if keys.index(kv.key) not in running:
                    candidates.append((keys.index(kv.key), kv.mod_revision, int(kv.value or b"0")))
                    if len(candidates) == wanted:
                        break
        return candidates

    async def _claim_one(
        self, batch_id: str, model: str, index: int, revision: int, attempts: int
    ) -> BatchItem | None:
        queued, running = keys.key(batch_id, "queued", index), keys.key(batch_id, "running", index)
        claim = keys.encoded({"node": self.node, "attempts": attempts + 1})
        for _ in range(2):  # once more under a new lease if this node's has just expired
            lease = await self.lease.get()
            try:
                reply = await self._txn(
                    [keys.mod_is(queued, revision), keys.absent(running)],
                    [
                        keys.put(running, claim, lease.id),
                        keys.put(queued, str(attempts + 1).encode()),
                        keys.get(keys.key(batch_id, "input", index)),
                    ],
                )
            except LeaseExpired:
                self.lease.lapsed(lease)
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
            running = keys.key(item.batch_id, "running", item.index)
            ops = [keys.delete(running)]
            if not attempted:
                ops.append(
                    keys.put(
                        keys.key(item.batch_id, "queued", item.index), b"%d" % (item.attempts - 1)
                    )
                )
            await self._txn([keys.mod_is(running, revision)], ops)

        await asyncio.gather(*(one(item) for item in items))

    # -- recording --------------------------------------------------------------------------

    async def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool:
        """The item's outcome, kept only if it has none yet; True if it was recorded. A result
        larger than ``MAX_ITEM_SIZE`` is recorded as an error saying so."""
        value = keys.encoded(outcome)
        if len(value) > MAX_ITEM_SIZE:
            success, value = (
                False,
                keys.encoded(
                    {
                        "code": 3006,
                        "message": f"the item's result is {len(value)} bytes, larger than the "
                        f"fleet's limit of {MAX_ITEM_SIZE} bytes per batch item",
                    }
                ),
            )
        queued = keys.key(batch_id, "queued", index)
        reply = await self._txn(
            [keys.exists(queued)],
            [
                keys.delete(queued),
                keys.delete(keys.key(batch_id, "running", index)),
                keys.put(keys.key(batch_id, "done" if success else "failed", index), value),
            ],
        )
        self._claims.pop((batch_id, index), None)
        if reply.succeeded:
            await self._finish_if_done(batch_id)
        return bool(reply.succeeded)

    async def _finish_if_done(self, batch_id: str) -> None:
        """Move the batch to the finished index once no item is left (whoever records last,
        or the next survey if that node died in between)."""
        counts = [
            keys.count(keys.prefix(batch_id, state)) for state in ("queued", "done", "failed")
        ]
        reply = await self._txn([], [*counts, keys.get(keys.OPEN + batch_id)])
        queued, done, failed = (r.response_range.count for r in reply.responses[:3])
        found = reply.responses[3].response_range.kvs
        if queued or not found:
            return
        record = {**json.loads(found[0].value), "finished": time.time()}
        record.update(done=done, failed=failed)
        record.pop("submitting", None)
        await self._txn(
            [keys.mod_is(keys.OPEN + batch_id, found[0].mod_revision)],
            [
                keys.delete(keys.OPEN + batch_id),
                keys.put(keys.FINISHED + batch_id, keys.encoded(record)),
            ],
        )

    # -- reading ----------------------------------------------------------------------------

    async def status(self, batch_id: str) -> BatchStatus | None:
        counts = [keys.count(keys.prefix(batch_id, state)) for state in keys.STATES]
        reply = await self._txn(
            [], [keys.get(keys.OPEN + batch_id), keys.get(keys.FINISHED + batch_id), *counts]
        )
        opened, finished = (r.response_range.kvs for r in reply.responses[:2])
        if finished:
            return keys.batch(finished[0]).finished_status()
        if not opened or json.loads(opened[0].value).get("submitting"):
            return None
        tally = {
            s: r.response_range.count for s, r in zip(keys.STATES, reply.responses[2:], strict=True)
        }
        return keys.batch(opened[0]).status(tally)

    async def results(self, batch_id: str) -> list[dict[str, Any]]:
        """One entry per item, in submission order."""
        reply = await self._txn(
            [], [keys.get(keys.OPEN + batch_id), keys.get(keys.FINISHED + batch_id)]
        )
        found = [kv for r in reply.responses for kv in r.response_range.kvs]
        if not found:
            return []
        total = int(json.loads(found[0].value)["total"])
        references: dict[int, str] = {}
        async for kv in self._scan(keys.prefix(batch_id, "ref")):
            references[keys.index(kv.key)] = bytes(kv.value).decode()
        outcomes: dict[int, tuple[bool, Any]] = {}
        for state in ("done", "failed"):
            async for kv in self._scan(keys.prefix(batch_id, state)):
                outcomes[keys.index(kv.key)] = (state == "done", json.loads(kv.value))
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
        tallies = await self._tallies([b.id for b in opened], keys.STATES)
        found = [b.status(tallies[b.id]) for b in opened]
        found += [keys.batch(kv).finished_status() async for kv in self._scan(keys.FINISHED)]
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
        tallies = await self._tallies([b.id for b in opened], keys.STATES)
        statuses = [b.status(tallies[b.id]) for b in opened]
        counted_at, finished = self._finished_tally
        if time.monotonic() - counted_at >= _FINISHED_EVERY:
            finished = {"done": 0, "failed": 0}
            async for kv in self._scan(keys.FINISHED):
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
        async for kv in self._scan(keys.FINISHED):
            if float(json.loads(kv.value)["finished"]) < now - retention:
                gone.append((keys.FINISHED, keys.batch_id(kv.key), kv.mod_revision))
        async for kv in self._scan(keys.OPEN):
            record = json.loads(kv.value)
            if record.get("submitting") and float(record["created"]) < now - _SUBMIT_GRACE:
                gone.append((keys.OPEN, keys.batch_id(kv.key), kv.mod_revision))
        removed = 0
        for index, batch_id, revision in gone:
            reply = await self._txn(
                [keys.mod_is(index + batch_id, revision)],
                [
                    keys.delete(index + batch_id),
                    keys.delete(keys.BATCHES + batch_id + "/", prefix=True),
                ],
            )
            removed += bool(reply.succeeded)
        return removed

    async def close(self) -> None:
        """Revoke this node's claims lease: the items it still holds are queued again at
        once. (The etcd connection belongs to the fleet node.)"""
        await self.lease.close()

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

    async def _open(self, model: str | None = None) -> list[keys.Batch]:
        """The unfinished batches (of ``model``), oldest first; none being submitted."""
        found = [keys.batch(kv) async for kv in self._scan(keys.OPEN)]
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
            reply = await self._txn([], [keys.count(keys.prefix(b, s)) for b, s in chunk])
            for (batch_id, state), response in zip(chunk, reply.responses, strict=True):
                tallies[batch_id][state] = response.response_range.count
        return tallies
