"""Sizes and durations as operators write them: ``"2GiB"``, ``"512MiB"``, ``"5m"``, ``"250ms"``.

``Bytes`` and ``Seconds`` are the pydantic field types of every size and duration in
``omni.toml`` and in ``Resources``/``Scaling``; ``parse_size`` and ``parse_duration`` are the same
rules for command-line options and trace files. A size is read as a ``pydantic.ByteSize``
(units ``KiB``, ``MiB``, ``GiB``, ``TiB``, and the decimal ``KB``, ``MB``, ``GB``, ``TB``, in any
case; no unit means bytes) and held as a plain int of bytes; a duration is seconds as a float
(units ``ms``, ``s``, ``m``, ``h``; no unit means seconds).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, ByteSize, PlainSerializer, TypeAdapter, ValidationError

__all__ = ["Bytes", "Seconds", "format_size", "parse_duration", "parse_size"]

# a number without a unit is seconds
_DURATION_UNITS = {"": 1.0, "us": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"512 MiB"`` or ``"1048576"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '2GiB', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return int(value)
    # ByteSize knows the units but reads only a prefix ("2GiB of RAM" would be 2 GiB): the
    # whole string must be one number and one unit.
    if _NUMBER_WITH_UNIT.match(value):
        try:
            return int(_BYTE_SIZE.validate_python(value))
        except ValidationError:
            pass
    raise ValueError(
        f"expected a size such as '2GiB', '512MiB', '64KiB' or a number of bytes, got {value!r}"
    )


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as ``"5m"``, ``"30s"``, ``"250ms"``, ``"300us"``
    or ``"2"``."""
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


# A plain int, not ByteSize: ``Resources(memory=2 << 30)`` type-checks as authors write it.
Bytes = Annotated[int, BeforeValidator(parse_size), PlainSerializer(int)]
Seconds = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(float)]
