"""Reading the per-process usage regions in /dev/shm, and removing those of dead processes."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

REGION_DIR = Path("/dev/shm")
REGION_PREFIX = "omni-gpu-"
MAGIC = 0x494E4D4F
VERSION = 1
# magic, version, pid, quota, used, peak, count, failures, reserved (cstub/src/omni.h).
LAYOUT = struct.Struct("<IIQQQQQQQ")


@dataclass(frozen=True, slots=True)
class Usage:
    """One process's GPU memory as the hooks count it; quota 0 means no quota."""

    pid: int
    quota: int
    used: int
    peak: int
    count: int
    failures: int


def region_path(pid: int, directory: Path = REGION_DIR) -> Path:
    """The default region of a process (when OMNI_GPU_SHM_NAME did not name another)."""
    return directory / f"{REGION_PREFIX}{pid}"


def read_usage(path: str | os.PathLike[str]) -> Usage:
    """Reads a usage region; raises ValueError when the file is not one.

    The file lives where the model's own process can write: it is opened without following a
    link or waiting on a FIFO, must be a regular file, and only the region's bytes are read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.pread(fd, LAYOUT.size, 0)
    finally:
        os.close(fd)
    if len(data) < LAYOUT.size:
        raise ValueError(f"{path} holds {len(data)} bytes, not a {LAYOUT.size}-byte usage region")
    magic, version, pid, quota, used, peak, count, failures, _ = LAYOUT.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError(
            f"{path} is not a version {VERSION} omni usage region (magic {magic:#x}, "
            f"version {version}); was it written by another omni-cstub release?"
        )
    return Usage(pid=pid, quota=quota, used=used, peak=peak, count=count, failures=failures)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(directory: str | os.PathLike[str] = REGION_DIR) -> list[Path]:
    """Removes the usage regions whose process is gone; returns the paths removed."""
    removed = []
    for path in sorted(Path(directory).glob(f"{REGION_PREFIX}*")):
        try:
            usage = read_usage(path)
        except (OSError, ValueError):
            continue
        if usage.pid > 0 and not _alive(usage.pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
