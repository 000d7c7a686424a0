"""The keys and etcd requests of the fleet's batch queue (``etcd_store.py`` uses them).

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

Each function here builds one key, or one etcd request (a range, a put, a delete, a
comparison) in aetcd's protobuf terms for the store's transactions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aetcd import rpc
from aetcd.utils import prefix_range_end

from omni_runtime.batch.store import BatchStatus
from omni_runtime.fleet import etcd

OPEN = "/omni/batch-index/open/"
FINISHED = "/omni/batch-index/finished/"
BATCHES = "/omni/batches/"
STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class Batch:
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


def prefix(batch_id: str, state: str) -> str:
    return f"{BATCHES}{batch_id}/{state}/"


def key(batch_id: str, state: str, index: int) -> str:
    return f"{BATCHES}{batch_id}/{state}/{index:08d}"


def index(key: bytes) -> int:
    return int(bytes(key).rpartition(b"/")[2])


def batch_id(key: bytes) -> str:
    return etcd.decode_key(key).rpartition("/")[2]


def batch(kv: Any) -> Batch:
    return Batch(batch_id(kv.key), json.loads(kv.value))


def encoded(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def put(key: str, value: bytes, lease: int = 0) -> Any:
    request = rpc.PutRequest(key=etcd.encode_key(key), value=value, lease=lease)
    return rpc.RequestOp(request_put=request)


def get(key: str) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=etcd.encode_key(key)))


def count(prefix: str) -> Any:
    key = etcd.encode_key(prefix)
    request = rpc.RangeRequest(key=key, range_end=prefix_range_end(key), count_only=True)
    return rpc.RequestOp(request_range=request)


def delete(key: str, prefix: bool = False) -> Any:
    encoded = etcd.encode_key(key)
    end = prefix_range_end(encoded) if prefix else b""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=encoded, range_end=end))


def compare(key: str, target: str, result: str, **value: int) -> Any:
    return rpc.Compare(
        key=etcd.encode_key(key),
        target=rpc.Compare.CompareTarget.Value(target),
        result=rpc.Compare.CompareResult.Value(result),
        **value,
    )


def exists(key: str) -> Any:
    return compare(key, "VERSION", "GREATER", version=0)


def absent(key: str) -> Any:
    return compare(key, "VERSION", "EQUAL", version=0)


def mod_is(key: str, revision: int) -> Any:
    return compare(key, "MOD", "EQUAL", mod_revision=revision)
