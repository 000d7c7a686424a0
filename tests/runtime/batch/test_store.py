"""The SQLite batch store: claims, idempotent recording, recovery and retention."""

from __future__ import annotations

import time
from pathlib import Path

from omni_runtime.batch import SqliteBatchStore


def _store(tmp_path: Path) -> SqliteBatchStore:
    return SqliteBatchStore(tmp_path / "batch.sqlite3")


def test_items_are_claimed_oldest_first_and_recorded_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = store.submit("m", [(b'{"x": 1}', "a"), (b'{"x": 2}', None)])
    second = store.submit("m", [(b'{"x": 3}', None)])
    claimed = store.claim("m", 2)
    assert [(i.batch_id, i.index) for i in claimed] == [(first, 0), (first, 1)]
    assert store.claim("other", 5) == []
    assert store.record(first, 0, True, {"y": 1})
    assert not store.record(first, 0, False, {"message": "late"})  # the first outcome stays
    assert store.record(first, 1, False, {"code": 5006, "message": "bad"})
    status = store.status(first)
    assert status is not None and status.finished and (status.done, status.failed) == (1, 1)
    results = store.results(first)
    assert results[0] == {"id": 0, "success": True, "result": {"y": 1}, "external_reference": "a"}
    assert results[1]["error"] == {"code": 5006, "message": "bad"} and results[1]["result"] is None
    assert store.status(second).status == "queued"  # type: ignore[union-attr]
    assert store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1}
    store.close()


def test_items_running_when_the_runtime_died_run_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    batch = store.submit("m", [(b"{}", None), (b"{}", None)])
    store.claim("m", 2)
    store.record(batch, 0, True, {})
    store.close()  # as if killed: item 1 was running
    reopened = _store(tmp_path)
    [again] = reopened.claim("m", 5)
    assert (again.index, again.attempts) == (1, 2)
    reopened.close()


def test_finished_batches_expire_after_the_retention(tmp_path: Path) -> None:
    store = _store(tmp_path)
    done = store.submit("m", [(b"{}", None)])
    pending = store.submit("m", [(b"{}", None), (b"{}", None)])
    store.claim("m", 1)
    store.record(done, 0, True, {})
    assert store.expire(time.time() + 10, retention=60) == 0
    assert store.expire(time.time() + 120, retention=60) == 1
    assert store.status(done) is None and store.status(pending) is not None
    assert store.results(done) == []
    store.close()
