"""A slow sync engine: each request holds its replica for the time it asks for."""

from __future__ import annotations

import time

from pydantic import BaseModel

from omni_sdk import Engine, Resources, Scaling, hookimpl


class Work(BaseModel):
    ms: float


class Done(BaseModel):
    ms: float


class Sleepy(Engine):
    name = "@bench/sleepy"
    resources = Resources(memory="256MiB")
    scaling = Scaling(target_ongoing_requests=1, max_replicas=8, max_queue_size=1024)

    def infer(self, request: Work) -> Done:
        time.sleep(request.ms / 1000)
        return Done(ms=request.ms)


@hookimpl
def register_engines(register):
    register(Sleepy)
