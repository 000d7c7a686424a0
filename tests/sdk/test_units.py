from __future__ import annotations

import pytest

from omni_sdk import Resources, Scaling
from omni_sdk._units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("512 MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("1048576", 1 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2 GiBs", "-1", "", True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5m", 300.0), ("30s", 30.0), ("250ms", 0.25), (2, 2.0), ("2", 2.0), ("0.92", 0.92)],
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_rejects() -> None:
    with pytest.raises(ValueError, match="duration such as"):
        parse_duration("soon")


def test_resources_and_scaling_accept_units() -> None:
    resources = Resources(memory="2GiB", gpu_memory="4GiB", cpus=0.5)  # type: ignore[arg-type]
    assert resources.memory == 2 << 30
    assert resources.gpu_memory == 4 << 30
    assert Scaling(idle_timeout="5m").idle_timeout == 300.0  # type: ignore[arg-type]
    assert format_size(2 << 30) == "2 GiB"
    with pytest.raises(ValueError, match="memory"):
        Resources(memory="a lot")  # type: ignore[arg-type]
