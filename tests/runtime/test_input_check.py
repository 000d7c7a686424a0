"""The runtime's check of an /ai/run body against a model's schema, before a cold start."""

from __future__ import annotations

import datetime
import enum
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omni_runtime.server.input_check import InputCheck
from omni_sdk.discover import schema_is_exact


class Color(enum.IntEnum):
    RED = 1


class Box(BaseModel):
    type: str  # a field named like a JSON schema keyword
    size: int = 0


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    count: int = 1
    values: list[float] = []
    flag: bool = False
    when: datetime.datetime | None = None
    tags: set[int] = set()
    color: Color = Color.RED
    mode: Literal["a", "b"] = "a"
    boxes: list[Box] = []
    code: str = Field(default="x", pattern=r"^\w+$")


ACCEPTED: list[dict[str, Any]] = [
    {"text": "hi"},
    {"text": "hi", "count": "3"},
    {"text": "hi", "count": 3.0},
    {"text": "hi", "flag": "yes"},
    {"text": "hi", "flag": 1},
    {"text": "hi", "when": 1700000000},
    {"text": "hi", "tags": [1, 1]},
    {"text": "hi", "color": "1"},
    {"text": "hi", "values": ["1.5", 2]},
    {"text": "hi", "boxes": [{"type": "x", "size": "2"}]},
    {"text": "hi", "options": {"rejectIfBusy": True}},  # the worker drops "options"
]
REFUSED = [
    ({}, "input 'text': Field required"),
    ({"text": 3}, "input 'text': expected string, got an integer"),
    ({"text": "hi", "count": [1]}, "input 'count': expected integer, got an array"),
    ({"text": "hi", "mode": "c"}, "input 'mode': 'c' is not one of ['a', 'b']"),
    ({"text": "hi", "extra": 1}, "input 'extra': Extra inputs are not permitted"),
    ({"text": "hi", "boxes": [{"size": 1}]}, "input 'boxes.0.type': Field required"),
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_what_pydantic_accepts_is_never_refused(body: dict[str, Any]) -> None:
    Request.model_validate({k: v for k, v in body.items() if k != "options"})
    assert InputCheck("@t/m", Request.model_json_schema()).problem(body) == ""


@pytest.mark.parametrize(("body", "says"), REFUSED)
def test_a_refusal_names_the_model_and_the_field(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError):
        Request.model_validate(body)
    assert InputCheck("@t/m", Request.model_json_schema()).problem(body) == f"model '@t/m': {says}"


class Split(BaseModel):
    words: list[str]

    @field_validator("words", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value


class Stripped(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    code: str = Field(max_length=1)


class ByName(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    text: str = Field(alias="Text")


def test_a_schema_that_does_not_say_everything_is_not_used() -> None:
    assert schema_is_exact(Request)
    # Each of these accepts a body its schema refuses: the runtime must leave them to the worker.
    assert not schema_is_exact(Split)  # "a b" for a list
    assert not schema_is_exact(Stripped)  # " a " for max_length=1
    assert not schema_is_exact(ByName)  # "text" for "Text"
