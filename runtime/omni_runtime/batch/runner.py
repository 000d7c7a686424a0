"""Runs queued batch items on the capacity interactive traffic leaves.

Items go through the model's own queue at batch priority, so an interactive request that arrives
goes before every waiting item; at most as many items are in flight on a model as its ready
replicas have room for (at least a batch for a batching engine, whose worker then runs them
together). An interactive request therefore waits behind at most one batch step. A model scaled
to zero is started for batch work only when the node has room to spare.

In a fleet the queue is shared (``store.shared``): each node claims only for the models it
serves, at most as many items as it has free slots, so a node with more idle room takes more;
and a node where the model is cold leaves the items a moment (``COLD_DEFER``) to the nodes
where it is warm, starting it only for what those leave.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from omni_runtime.batch.store import (
    AsyncBatchStore,
    BatchItem,
    BatchStore,
    BatchStoreUnavailable,
    asynchronous,
)
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import (
    Controller,
    ModelBusy,
    ModelHandle,
    ModelUnavailable,
    ServedModel,
)
from omni_runtime.scheduler.queue import Priority
from omni_sdk.wire import Kind

__all__ = ["COLD_DEFER", "BatchRunner", "claim_limit"]

log = logging.getLogger("omni.batch")
T = TypeVar("T")
MAX_ATTEMPTS = 3  # an item whose model keeps failing to run it is recorded as failed
_EXPIRE_EVERY = 60.0
COLD_DEFER = 1.0  # seconds a fleet's items wait for a warm node before a cold one starts the model


def claim_limit(free: int, warm: bool, waited: float, shared: bool) -> int:
    """How many queued items of a model this node claims now: its free slots, except that in
    a shared queue a node where the model is cold (no replica ready) leaves items that have
    waited less than ``COLD_DEFER`` to nodes where it is warm."""
    if free <= 0 or (shared and not warm and waited < COLD_DEFER):
        return 0
    return free


class BatchRunner:
    def __init__(
        self,
        store: BatchStore | AsyncBatchStore,
        node: Controller | None,
        retention: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = asynchronous(store)  # SQLite's calls run on a thread of their own
        self.node = node
        self.retention = retention
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._stopped = False
        self._backoff: dict[str, float] = {}
        self._waiting: dict[str, float] = {}  # since when each model has had items queued
        # Items by state, refreshed by the dispatch loop: a /metrics scrape reads this and
        # never waits for the store (SQLite's disk, a fleet's etcd) on the event loop.
        self.counts: dict[str, int] = {}
        if metrics is not None:
            metrics.watch_batches(lambda: self.counts)

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    async def _run(self) -> None:
        expired_at = 0.0
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
            try:
                await self._dispatch()
                self.counts = await self.store.counts()
                now = time.time()
                if now - expired_at > _EXPIRE_EVERY:
                    expired_at = now
                    gone = await self.store.expire(now, self.retention)
                    if gone:
                        log.info("removed %d batches past their retention", gone)
                if failing:
                    log.info("batch dispatch works again")
                failing = False
            except Exception as exc:  # the batch queue must never stop for good
                if isinstance(exc, BatchStoreUnavailable):
                    if not failing:
                        log.warning("batch dispatch: %s; trying again", exc)
                else:
                    log.exception("batch dispatch failed; trying again")
                failing = True
                await asyncio.sleep(1.0)

    async def _dispatch(self) -> None:
        if self.node is None:  # a fleet's router: it takes batches and runs none
            return
        queued = await self.store.queued_models()
        now = time.monotonic()
        self._waiting = {name: self._waiting.get(name, now) for name in queued}
        for name in queued:
            model = self.node.models.get(name)
            if model is None or self._backoff.get(name, 0.0) > now:
                continue  # (a model not served here: its items wait for a node that serves it)
            if model.failure:  # it cannot start: its items fail with the reason
                for item in await self.store.claim(name, 256):
                    error = {"code": 3042, "message": model.failure}
                    await self._record(item, False, error)
                continue
            free = self._slots(model) - self.in_flight[name]
            limit = claim_limit(
                free, model.ready_replicas > 0, now - self._waiting[name], self.store.shared
            )
            if limit <= 0:
                continue
            for item in await self.store.claim(name, limit):
                task = asyncio.ensure_future(self._run_item(model, item))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _slots(self, model: ServedModel) -> int:
        """How many items may be in flight on the model now."""
        if model.closing or model.unloading or model.failure:
            return 0
        ready = model.ready_replicas
        if ready == 0:
            # Scaled to zero (or starting): one item starts it, if the node has room to spare.
            starting = any(r for r in model.replicas)
            return 1 if starting or (self.node and self.node.has_room_for(model)) else 0
        per_replica = max(model.capacity, model.spec.max_batch_size)
        return ready * per_replica

    async def _run_item(self, model: ServedModel, item: BatchItem) -> None:
        self.in_flight[model.name] += 1
        try:
            try:
                status, _, body = await ModelHandle(model).call(  # counted as any request
                    Kind.RUN_JSON, [item.body], priority=Priority.BATCH
                )
            except ModelBusy:  # its queue is full of interactive work: later, at no cost
                await self._persist(self.store.release, [item], False)
                self._backoff[model.name] = time.monotonic() + 0.5
                return
            except ModelUnavailable as exc:
                await self._not_run(model, item, str(exc))
                return
            envelope = _envelope(body)
            if status == 503:  # the worker died under it: at least once, so again
                await self._not_run(model, item, _message(envelope))
            elif status == 200 and "result" in envelope:
                await self._record(item, True, envelope["result"])
            else:
                errors = envelope.get("errors") or [{"code": status, "message": str(envelope)}]
                await self._record(item, False, errors[0])
        except asyncio.CancelledError:
            raise  # the runtime stops: the item runs again (at the next start; in a fleet,
            # on another node once this one's claims are given back)
        except Exception as exc:  # nothing an item does may stall its batch
            log.exception("batch item %s/%d failed", item.batch_id, item.index)
            error = {"code": 3043, "message": f"the item could not be run: {exc}"}
            with contextlib.suppress(Exception):
                await self._record(item, False, error)
        finally:
            self.in_flight[model.name] -= 1
            self.wake()

    async def _not_run(self, model: ServedModel, item: BatchItem, reason: str) -> None:
        """The item did not run (the model is busy, stopping or its worker died): queue it
        again, or give up on it after MAX_ATTEMPTS."""
        if item.attempts >= MAX_ATTEMPTS and not model.closing:
            error = {
                "code": 3042,
                "message": f"model '{model.name}' could not run this item in {item.attempts} "
                f"attempts: {reason}",
            }
            await self._record(item, False, error)
            return
        await self._persist(self.store.release, [item])
        self._backoff[model.name] = time.monotonic() + 1.0

    async def _record(self, item: BatchItem, success: bool, outcome: Any) -> None:
        await self._persist(self.store.record, item.batch_id, item.index, success, outcome)

    async def _persist(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A store call that must not be lost (an outcome in hand, a claim to give back):
        tried again while the store cannot be reached, until it answers or the runtime stops.
        (An item left claimed by a live node would wait for ever.)"""
        delay = 0.5
        while True:
            try:
                return await operation(*args)
            except BatchStoreUnavailable as exc:
                log.warning("batch: %s; trying again in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _envelope(body: bytes) -> dict[str, Any]:
    """The worker's Workers AI envelope, or an error one around whatever it sent."""
    try:
        envelope = json.loads(body)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        return {"errors": [{"code": 3043, "message": body.decode(errors="replace")[:1000]}]}
    return envelope


def _message(envelope: dict[str, Any]) -> str:
    errors = envelope.get("errors") or [{}]
    return str(errors[0].get("message", envelope))
