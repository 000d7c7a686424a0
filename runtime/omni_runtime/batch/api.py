"""The Workers AI asynchronous batch flow on ``/ai/run/{model}`` (DESIGN.md, Batch API).

POST /ai/run/{model}?queueRequest=true   {"requests": [item, ...]}   -> queued, request_id
POST /ai/run/{model}                     {"request_id": "..."}       -> queued | running,
                                                                        then the responses
GET  /ai/batch                                                       -> the store's batches

In a fleet every node reads the one shared store, so any node answers for any batch.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from omni_runtime.batch.runner import BatchRunner
from omni_runtime.scheduler import ModelHandle

__all__ = ["batch_index", "is_poll", "is_submission", "poll", "submit"]

Answer = tuple[int, dict[str, Any]]  # HTTP status, the envelope's result or error message


def is_submission(query_string: bytes) -> bool:
    if b"queueRequest" not in query_string:
        return False
    values = parse_qs(query_string.decode(errors="replace")).get("queueRequest", [])
    return any(v.lower() in ("true", "1") for v in values)


def is_poll(body: bytes) -> str | None:
    """The request_id of a body that is only ``{"request_id": "..."}``, else None."""
    if b"request_id" not in body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(request, dict) and list(request) == ["request_id"]:
        value = request["request_id"]
        return value if isinstance(value, str) else ""
    return None


async def submit(runner: BatchRunner, model: ModelHandle, body: bytes, limit: int) -> Answer:
    if len(body) > limit:
        return 413, {
            "error": f"model '{model.name}': the batch is {len(body)} bytes, larger than the "
            f"server's limit of {limit} bytes (server.batch_max_size in omni.toml)"
        }
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return 400, {"error": f"model '{model.name}': the batch is not valid JSON: {exc}"}
    requests = request.get("requests") if isinstance(request, dict) else None
    if not isinstance(requests, list) or not requests:
        return 400, {
            "error": f"model '{model.name}': a batch needs 'requests', a non-empty list of the "
            "model's inputs"
        }
    items: list[tuple[bytes, str | None]] = []
    item_limit = runner.store.max_item_size
    for index, item in enumerate(requests):
        if not isinstance(item, dict):
            return 400, {"error": f"model '{model.name}': requests[{index}] must be an object"}
        item = dict(item)
        reference = item.pop("external_reference", None)
        if reference is not None and not isinstance(reference, str):
            return 400, {
                "error": f"model '{model.name}': requests[{index}].external_reference must be "
                "a string"
            }
        encoded = json.dumps(item).encode()
        size = len(encoded) + len((reference or "").encode())
        if item_limit is not None and size > item_limit:
            return 413, {
                "error": f"model '{model.name}': requests[{index}] is {size} bytes, larger than "
                f"the fleet's limit of {item_limit} bytes per batch item (etcd keeps them; "
                "docs/batch.md); send it as an ordinary request"
            }
        items.append((encoded, reference))
    request_id = await runner.store.submit(model.name, items)
    runner.wake()
    return 200, {"result": {"status": "queued", "request_id": request_id, "model": model.name}}


async def poll(runner: BatchRunner, model: ModelHandle, request_id: str) -> Answer:
    status = await runner.store.status(request_id) if request_id else None
    if status is None or status.model != model.name:
        return 404, {
            "error": f"model '{model.name}': no batch with request_id {request_id!r} (unknown, "
            "for another model, or past its retention)"
        }
    if not status.finished:
        return 200, {
            "result": {
                "status": status.status,
                "request_id": request_id,
                "model": model.name,
                "total": status.total,
                "done": status.done,
                "failed": status.failed,
            }
        }
    responses = await runner.store.results(request_id)
    return 200, {
        "result": {
            "status": "done",
            "request_id": request_id,
            "model": model.name,
            "responses": responses,
            "usage": _usage(responses),
        }
    }


async def batch_index(runner: BatchRunner) -> list[dict[str, Any]]:
    return [
        {
            "request_id": s.request_id,
            "model": s.model,
            "status": s.status,
            "created": s.created,
            "total": s.total,
            "queued": s.queued,
            "running": s.running,
            "done": s.done,
            "failed": s.failed,
        }
        for s in await runner.store.batches()
    ]


def _usage(responses: list[dict[str, Any]]) -> dict[str, int]:
    """Token counts summed over the results that report them (text generation does)."""
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for response in responses:
        result = response.get("result")
        usage = result.get("usage") if isinstance(result, dict) else None
        if isinstance(usage, dict):
            for key in totals:
                value = usage.get(key)
                if isinstance(value, int):
                    totals[key] += value
    return totals
