"""Runs queued batch items on the capacity interactive traffic leaves.

Items go through the model's own queue at batch priority, so an interactive request that arrives
goes before every waiting item; at most as many items are in flight on a model as its ready
replicas have room for (at least a batch for a batching engine, whose worker then runs them
together). An interactive request therefore waits behind at most one batch step. A model scaled
to zero is started for batch work only when the node has room to spare.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from omni_runtime.batch.store import BatchItem, BatchStore
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

__all__ = ["BatchRunner"]

log = logging.getLogger("omni.batch")
T = TypeVar("T")
MAX_ATTEMPTS = 3  # an item whose model keeps failing to run it is recorded as failed
_EXPIRE_EVERY = 60.0


class BatchRunner:
    def __init__(
        self, store: BatchStore, node: Controller, retention: float, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.node = node
        self.retention = retention
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="omni-batch-store")
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._backoff: dict[str, float] = {}
        # Items by state, refreshed by the dispatch loop on the store's thread: a /metrics
        # scrape reads this and never waits for SQLite on the event loop.
        self.counts: dict[str, int] = {}
        if metrics is not None:
            metrics.watch_batches(lambda: self.counts)

    async def db(self, function: Callable[..., T], *args: Any) -> T:
        """Run a store call on the store's own thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.db(self.store.close)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        expired_at = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
            try:
                await self._dispatch()
                self.counts = await self.db(self.store.counts)
                now = time.time()
                if now - expired_at > _EXPIRE_EVERY:
                    expired_at = now
                    gone = await self.db(self.store.expire, now, self.retention)
                    if gone:
                        log.info("removed %d batches past their retention", gone)
            except Exception:  # the batch queue must never stop for good
                log.exception("batch dispatch failed; trying again")
                await asyncio.sleep(1.0)

    async def _dispatch(self) -> None:
        queued = await self.db(self.store.queued_models)
        now = time.monotonic()
        for name in queued:
            model = self.node.models.get(name)
            if model is None or self._backoff.get(name, 0.0) > now:
                continue  # (a model no longer served: its items wait for it to come back)
            if model.failure:  # it cannot start: its items fail with the reason
                for item in await self.db(self.store.claim, name, 256):
                    error = {"code": 3042, "message": model.failure}
                    await self.db(self.store.record, item.batch_id, item.index, False, error)
                continue
            free = self._slots(model) - self.in_flight[name]
            if free <= 0:
                continue
            for item in await self.db(self.store.claim, name, free):
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
            return 1 if starting or self.node.has_room_for(model) else 0
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
                await self.db(self.store.release, [item], False)
                self._backoff[model.name] = time.monotonic() + 0.5
                return
            except ModelUnavailable as exc:
                await self._not_run(model, item, str(exc))
                return
            envelope = _envelope(body)
            if status == 503:  # the worker died under it: at least once, so again
                await self._not_run(model, item, _message(envelope))
            elif status == 200 and "result" in envelope:
                result = envelope["result"]
                await self.db(self.store.record, item.batch_id, item.index, True, result)
            else:
                errors = envelope.get("errors") or [{"code": status, "message": str(envelope)}]
                await self.db(self.store.record, item.batch_id, item.index, False, errors[0])
        except asyncio.CancelledError:
            raise  # the runtime stops: the item stays running, and runs again at the next start
        except Exception as exc:  # nothing an item does may stall its batch
            log.exception("batch item %s/%d failed", item.batch_id, item.index)
            error = {"code": 3043, "message": f"the item could not be run: {exc}"}
            with contextlib.suppress(Exception):
                await self.db(self.store.record, item.batch_id, item.index, False, error)
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
            await self.db(self.store.record, item.batch_id, item.index, False, error)
            return
        await self.db(self.store.release, [item])
        self._backoff[model.name] = time.monotonic() + 1.0


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
