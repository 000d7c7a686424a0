"""The cheapest possible engine: what remains is the cost of serving it."""

from __future__ import annotations

from pydantic import BaseModel

from omni_sdk import Engine, Scaling, hookimpl


class Text(BaseModel):
    text: str


class Trivial(Engine):
    name = "@bench/trivial"
    scaling = Scaling(max_queue_size=1024)

    def infer(self, request: Text) -> Text:
        return request


@hookimpl
def register_engines(register):
    register(Trivial)
