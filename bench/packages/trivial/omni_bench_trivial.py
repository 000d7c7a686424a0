"""The cheapest possible engines: what remains is the cost of serving them. One per request
shape bench/overhead.py measures: a string, one float, a list of floats."""

from __future__ import annotations

from pydantic import BaseModel

from omni_sdk import Engine, Scaling, hookimpl


class Text(BaseModel):
    text: str


class Value(BaseModel):
    value: float


class Values(BaseModel):
    values: list[float]


class Trivial(Engine):
    name = "@bench/trivial"
    scaling = Scaling(max_queue_size=1024)

    def infer(self, request: Text) -> Text:
        return request


class TrivialValue(Engine):
    name = "@bench/value"
    scaling = Scaling(max_queue_size=1024)

    def infer(self, request: Value) -> Value:
        return request


class TrivialValues(Engine):
    name = "@bench/values"
    scaling = Scaling(max_queue_size=1024)

    def infer(self, request: Values) -> Values:
        return request


@hookimpl
def register_engines(register):
    register(Trivial)
    register(TrivialValue)
    register(TrivialValues)
