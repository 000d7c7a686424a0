"""Where queued batch items live: a small interface, and SQLite behind it by default.

The runtime keeps one ``batch.sqlite3`` in its state directory (WAL mode, synchronous=NORMAL:
a committed submission survives ``kill -9`` of the runtime; only a power cut may lose the last
transactions). Execution is at least once: items that were running when the runtime died are
queued again when it starts. Recording is idempotent: an item's first outcome is kept, any later
one for the same item is ignored, so every item appears exactly once in its batch's results.

The runner calls a store through ``AsyncBatchStore``: a store reached over the network (a
fleet's, on etcd: ``batch/etcd_store.py``) implements it itself, and ``InThread`` gives it to a
``BatchStore`` such as SQLite, whose calls run on a thread of their own, off the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

__all__ = [
    "AsyncBatchStore",
    "BatchItem",
    "BatchStatus",
    "BatchStore",
    "BatchStoreUnavailable",
    "InThread",
    "SqliteBatchStore",
    "asynchronous",
]

T = TypeVar("T")


@dataclass(frozen=True)
class BatchItem:
    batch_id: str
    index: int
    model: str
    body: bytes  # the item's input, as the model's /ai/run JSON
    attempts: int = 1  # how many times it has been claimed, this time included


@dataclass(frozen=True)
class BatchStatus:
    request_id: str
    model: str
    created: float
    total: int
    queued: int
    running: int
    done: int
    failed: int

    @property
    def finished(self) -> bool:
        return self.done + self.failed == self.total

    @property
    def status(self) -> str:
        if self.finished:
            return "done"
        return "running" if self.running or self.done or self.failed else "queued"


class BatchStore(Protocol):
    """What the runtime needs of a durable batch queue."""

    def submit(self, model: str, items: list[tuple[bytes, str | None]]) -> str: ...
    def claim(self, model: str, limit: int) -> list[BatchItem]: ...
    def release(self, items: list[BatchItem], attempted: bool = True) -> None: ...
    def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool: ...
    def status(self, batch_id: str) -> BatchStatus | None: ...
    def results(self, batch_id: str) -> list[dict[str, Any]]: ...
    def batches(self) -> list[BatchStatus]: ...
    def queued_models(self) -> dict[str, int]: ...
    def counts(self) -> dict[str, int]: ...
    def expire(self, now: float, retention: float) -> int: ...
    def close(self) -> None: ...


class BatchStoreUnavailable(Exception):
    """The batch store cannot be reached now (a fleet's etcd is away); the message says why."""


class AsyncBatchStore(Protocol):
    """``BatchStore``'s operations as coroutines: what the runner and the API call."""

    shared: bool  # several nodes take items from it (a fleet's)
    max_item_size: int | None  # the largest item, input or result, it keeps (bytes), if any

    async def submit(self, model: str, items: list[tuple[bytes, str | None]]) -> str: ...
    async def claim(self, model: str, limit: int) -> list[BatchItem]: ...
    async def release(self, items: list[BatchItem], attempted: bool = True) -> None: ...
    async def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool: ...
    async def status(self, batch_id: str) -> BatchStatus | None: ...
    async def results(self, batch_id: str) -> list[dict[str, Any]]: ...
    async def batches(self) -> list[BatchStatus]: ...
    async def queued_models(self) -> dict[str, int]: ...
    async def counts(self) -> dict[str, int]: ...
    async def expire(self, now: float, retention: float) -> int: ...
    async def close(self) -> None: ...


def asynchronous(store: BatchStore | AsyncBatchStore) -> AsyncBatchStore:
    """``store`` itself when its operations are coroutines, else ``InThread(store)``."""
    if inspect.iscoroutinefunction(store.claim):
        return cast(AsyncBatchStore, store)
    return InThread(cast(BatchStore, store))


class InThread:
    """``AsyncBatchStore`` over a ``BatchStore``: each call runs on the store's own thread,
    one at a time, so the event loop never waits for the disk."""

    shared: bool = False
    max_item_size: int | None = None

    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="omni-batch-store")

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def submit(self, model: str, items: list[tuple[bytes, str | None]]) -> str:
        return await self._run(self.store.submit, model, items)

    async def claim(self, model: str, limit: int) -> list[BatchItem]:
        return await self._run(self.store.claim, model, limit)

    async def release(self, items: list[BatchItem], attempted: bool = True) -> None:
        await self._run(self.store.release, items, attempted)

    async def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool:
        return await self._run(self.store.record, batch_id, index, success, outcome)

    async def status(self, batch_id: str) -> BatchStatus | None:
        return await self._run(self.store.status, batch_id)

    async def results(self, batch_id: str) -> list[dict[str, Any]]:
        return await self._run(self.store.results, batch_id)

    async def batches(self) -> list[BatchStatus]:
        return await self._run(self.store.batches)

    async def queued_models(self) -> dict[str, int]:
        return await self._run(self.store.queued_models)

    async def counts(self) -> dict[str, int]:
        return await self._run(self.store.counts)

    async def expire(self, now: float, retention: float) -> int:
        return await self._run(self.store.expire, now, retention)

    async def close(self) -> None:
        try:
            await self._run(self.store.close)
        finally:
            self._executor.shutdown(wait=True)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    model TEXT NOT NULL,
    body BLOB NOT NULL,
    external_reference TEXT,
    state TEXT NOT NULL,          -- queued | running | done | failed
    outcome TEXT,                 -- JSON: the result, or the error
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS items_queued ON items (model, state, batch_id, idx);
"""


class SqliteBatchStore:
    """``BatchStore`` in one SQLite file (WAL). Safe to call from any one thread at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        # Items a killed runtime was running: run them again (at least once).
        with self._lock:
            self._db.execute("UPDATE items SET state = 'queued' WHERE state = 'running'")

    def submit(self, model: str, items: list[tuple[bytes, str | None]]) -> str:
        batch_id = secrets.token_hex(16)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO batches (id, model, created) VALUES (?, ?, ?)",
                    (batch_id, model, time.time()),
                )
                self._db.executemany(
                    "INSERT INTO items (batch_id, idx, model, body, external_reference, state) "
                    "VALUES (?, ?, ?, ?, ?, 'queued')",
                    [(batch_id, i, model, body, ref) for i, (body, ref) in enumerate(items)],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return batch_id

    def claim(self, model: str, limit: int) -> list[BatchItem]:
        """Up to ``limit`` queued items of ``model``, oldest batch first, marked running."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT i.batch_id, i.idx, i.body, i.attempts FROM items i JOIN batches b "
                    "ON b.id = i.batch_id WHERE i.model = ? AND i.state = 'queued' "
                    "ORDER BY b.created, i.idx LIMIT ?",
                    (model, limit),
                ).fetchall()
                self._db.executemany(
                    "UPDATE items SET state = 'running', attempts = attempts + 1 "
                    "WHERE batch_id = ? AND idx = ?",
                    [(r[0], r[1]) for r in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [BatchItem(r[0], r[1], model, bytes(r[2]), r[3] + 1) for r in rows]

    def release(self, items: list[BatchItem], attempted: bool = True) -> None:
        """Put claimed items back in the queue (they did not run); ``attempted=False``: the
        claim does not count against them (the model was only busy)."""
        refund = 0 if attempted else 1
        with self._lock:
            self._db.executemany(
                "UPDATE items SET state = 'queued', attempts = attempts - ? "
                "WHERE batch_id = ? AND idx = ? AND state = 'running'",
                [(refund, i.batch_id, i.index) for i in items],
            )

    def record(self, batch_id: str, index: int, success: bool, outcome: Any) -> bool:
        """The item's outcome, kept only if it has none yet; True if it was recorded."""
        state = "done" if success else "failed"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "UPDATE items SET state = ?, outcome = ? WHERE batch_id = ? AND idx = ? "
                    "AND state IN ('queued', 'running')",
                    (state, json.dumps(outcome), batch_id, index),
                )
                recorded = cursor.rowcount == 1
                if recorded:
                    left = self._db.execute(
                        "SELECT COUNT(*) FROM items WHERE batch_id = ? "
                        "AND state IN ('queued', 'running')",
                        (batch_id,),
                    ).fetchone()[0]
                    if not left:
                        self._db.execute(
                            "UPDATE batches SET finished = ? WHERE id = ?", (time.time(), batch_id)
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return recorded

    def status(self, batch_id: str) -> BatchStatus | None:
        with self._lock:
            batch = self._db.execute(
                "SELECT id, model, created FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if batch is None:
                return None
            counts = dict(
                self._db.execute(
                    "SELECT state, COUNT(*) FROM items WHERE batch_id = ? GROUP BY state",
                    (batch_id,),
                ).fetchall()
            )
        return _status(batch, counts)

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        """One entry per item, in submission order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, state, outcome, external_reference FROM items WHERE batch_id = ? "
                "ORDER BY idx",
                (batch_id,),
            ).fetchall()
        results = []
        for index, state, outcome, reference in rows:
            value = json.loads(outcome) if outcome is not None else None
            entry: dict[str, Any] = {"id": index, "success": state == "done"}
            if state == "done":
                entry["result"] = value
            else:
                entry["result"] = None
                entry["error"] = value
            entry["external_reference"] = reference
            results.append(entry)
        return results

    def batches(self) -> list[BatchStatus]:
        with self._lock:
            rows = self._db.execute(
                "SELECT b.id, b.model, b.created, i.state, COUNT(i.idx) FROM batches b "
                "LEFT JOIN items i ON i.batch_id = b.id GROUP BY b.id, i.state "
                "ORDER BY b.created"
            ).fetchall()
        found: dict[str, tuple[tuple[str, str, float], dict[str, int]]] = {}
        for batch_id, model, created, state, count in rows:
            entry = found.setdefault(batch_id, ((batch_id, model, created), {}))
            if state is not None:
                entry[1][state] = count
        return [_status(batch, counts) for batch, counts in found.values()]

    def queued_models(self) -> dict[str, int]:
        """Models with queued items, and how many."""
        with self._lock:
            return dict(
                self._db.execute(
                    "SELECT model, COUNT(*) FROM items WHERE state = 'queued' GROUP BY model"
                ).fetchall()
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict(
                self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
            )
        return {state: counts.get(state, 0) for state in ("queued", "running", "done", "failed")}

    def expire(self, now: float, retention: float) -> int:
        """Remove batches finished more than ``retention`` seconds ago; how many went."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM batches WHERE finished IS NOT NULL AND finished < ?",
                (now - retention,),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _status(batch: tuple[str, str, float], counts: dict[str, int]) -> BatchStatus:
    return BatchStatus(
        request_id=batch[0],
        model=batch[1],
        created=batch[2],
        total=sum(counts.values()),
        queued=counts.get("queued", 0),
        running=counts.get("running", 0),
        done=counts.get("done", 0),
        failed=counts.get("failed", 0),
    )
