"""An engine's warm-up request (``Engine.warmup``), answered by a new replica before it takes
any traffic: the first real request does not pay for lazy initialisation, and a version being
rolled out that cannot answer it never gets traffic (its rollout fails, naming why).

A cold start from zero with requests waiting skips it: they would wait for the warm-up too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from omni_runtime.scheduler.backend import LoadFailed, Worker, WorkerGone
from omni_runtime.scheduler.models import ServedModel
from omni_sdk.wire import Kind

__all__ = ["warm_up", "wants_warm_up"]

log = logging.getLogger("omni.scheduler")


def wants_warm_up(model: ServedModel) -> bool:
    """Whether a replica of ``model`` that just started answers its warm-up first: when the
    engine declares one, unless requests wait with no other replica ready to serve them."""
    if model.spec.warmup is None:
        return False
    return not (len(model.queue) and not model.ready_replicas)


async def warm_up(model: ServedModel, worker: Worker, timeout: float) -> None:
    """Send ``model``'s warm-up request to ``worker``; ``LoadFailed`` (the worker killed)
    when it fails, raises or has no answer within ``timeout`` seconds."""
    spec = model.spec
    label = f"model '{spec.name}' version {spec.version}"
    began = time.monotonic()
    future = worker.request(Kind.RUN_JSON, [json.dumps(spec.warmup).encode()])
    try:
        status, _, body = await asyncio.wait_for(future, timeout)
    except TimeoutError:
        problem = f"no answer within {timeout:.0f}s (server.load_timeout)"
    except WorkerGone as exc:
        problem = f"its worker ended: {exc}"
    else:
        if status == 200:
            log.info("%s: warm-up request answered in %.3fs", label, time.monotonic() - began)
            return
        problem = f"answered {status}: {_message(body)}"
    worker.kill()
    await worker.wait()
    raise LoadFailed(f"{label}: its warm-up request failed: {problem}")


def _message(body: bytes) -> str:
    """The error an answer carries (the /ai/run envelope's first), else its first bytes."""
    try:
        errors = json.loads(body).get("errors")
        return str(errors[0]["message"])
    except (ValueError, AttributeError, TypeError, LookupError):
        return body[:500].decode(errors="replace")
