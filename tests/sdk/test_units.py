from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from omni_sdk import Resources, Scaling
from omni_sdk.units import Bytes, Seconds, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("512 MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("1048576", 1 << 20),
        (4096, 4096),
        ("1GiB", 1 << 30),
        ("512MiB", 512 << 20),
        ("1.5 GiB", 3 << 29),
        ("2gb", 2 * 1000**3),
        (" 64 kib ", 64 << 10),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2 GiBs", "-1", "", True, -1, "2GiB of RAM", "1e3"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("250ms", 0.25),
        ("300us", 0.0003),
        ("1h", 3600.0),
        (2, 2.0),
        ("2", 2.0),  # a plain number of seconds, as the error message promises
        (" 2 ", 2.0),
        ("0.92", 0.92),
    ],
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["soon", "2 days", "-2", "", True, -1])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


class _Limits(BaseModel):
    cache: Bytes = 0
    grace: Seconds = 0.0


def test_field_types_parse_units_and_serialize_as_numbers() -> None:
    limits = _Limits(cache="512MiB", grace="2")  # type: ignore[arg-type]
    assert limits.cache == 512 << 20 and type(limits.cache) is int
    assert limits.grace == 2.0
    assert limits.model_dump() == {"cache": 512 << 20, "grace": 2.0}
    assert limits.model_dump_json() == '{"cache":536870912,"grace":2.0}'


def test_field_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"cache\n.*expected a size such as '2GiB'"):
        _Limits(cache="lots")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"grace\n.*a number of seconds"):
        _Limits(grace="soon")  # type: ignore[arg-type]


def test_resources_and_scaling_accept_units() -> None:
    resources = Resources(memory="2GiB", gpu_memory="4GiB", cpus=0.5)  # type: ignore[arg-type]
    assert resources.memory == 2 << 30
    assert resources.gpu_memory == 4 << 30
    assert Scaling(idle_timeout="5m").idle_timeout == 300.0  # type: ignore[arg-type]
    assert format_size(2 << 30) == "2 GiB"
    with pytest.raises(ValueError, match="memory"):
        Resources(memory="a lot")  # type: ignore[arg-type]
