"""The environment a worker is started with so the hooks load before its first CUDA call."""

from __future__ import annotations

import re
from typing import Literal

from omni_cstub._library import library_path

_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1000**i for i, p in enumerate(["k", "m", "g", "t"], start=1)},
    **{p + "b": 1000**i for i, p in enumerate(["k", "m", "g", "t"], start=1)},
    **{p + "i": 1024**i for i, p in enumerate(["k", "m", "g", "t"], start=1)},
    **{p + "ib": 1024**i for i, p in enumerate(["k", "m", "g", "t"], start=1)},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*")


def parse_size(size: int | str) -> int:
    """Bytes from 2147483648, "2GiB", "512MiB" or "1.5GB" (the rules the C library follows)."""
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"a memory size cannot be negative, got {size}")
        return size
    match = _SIZE.fullmatch(size)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{size!r} is not a memory size; use bytes or a number with a unit such as "
            "512MiB, 2GiB or 1.5GB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def preload_env(
    quota: int | str | None,
    *,
    mode: Literal["managed", "device"] = "managed",
    shm_name: str | None = None,
) -> dict[str, str]:
    """Variables to add to one worker's exec environment (never to the runtime's own)."""
    env = {
        "LD_PRELOAD": str(library_path()),
        "OMNI_CUDA_MODE": mode,
        "OMNI_GPU_MEMORY_LIMIT": str(parse_size(quota)) if quota is not None else "0",
    }
    if shm_name is not None:
        env["OMNI_GPU_SHM_NAME"] = shm_name
    return env
