"""Sizes and durations as operators write them: ``"2GiB"``, ``"512MiB"``, ``"5m"``, ``"250ms"``."""

from __future__ import annotations

import re

__all__ = ["parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}  # "": seconds
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"512 MiB"`` or ``"1048576"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '2GiB', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return int(value)
    match = _NUMBER_WITH_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"expected a size such as '2GiB', '512MiB', '64KiB' or a number of bytes, got {value!r}"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as ``"5m"``, ``"30s"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    match = _NUMBER_WITH_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(
            "expected a duration such as '250ms', '30s', '5m' or a number of seconds, "
            f"got {value!r}"
        )
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_size(n: int) -> str:
    """``2147483648`` → ``"2 GiB"``: for messages a person reads."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"
