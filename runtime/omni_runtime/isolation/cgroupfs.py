"""What the cgroup v1 and v2 drivers share: the limits they set, writing and reading cgroup files,
finding this process's own cgroup, killing what is in a cgroup and removing cgroups (stale ones
included)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import time
from pathlib import Path

log = logging.getLogger("omni.isolation")
DEFAULT_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
DEFAULT_PIDS_MAX = 4096


class CgroupError(Exception):
    """A cgroup could not be made or configured; the message names the file."""


def write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from exc


def read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def read_keyed(path: Path, key: str) -> int:
    """A value from a flat keyed file such as memory.events (``oom_kill 1``)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def remove_dir(path: Path, attempts: int = 100, wait: bool = False, kill: bool = False) -> None:
    """rmdir a cgroup; a plain directory standing in for cgroupfs (tests) is deleted whole.

    Processes just killed take a moment to leave. On the event loop it tries again a little
    later rather than sleeping on the loop; with ``wait`` (shutting down), or off the loop, it
    waits for them. With ``kill`` it kills what is in it before each try: a process that forked
    after the last look (a pre-warmed process making a worker) is not left behind.
    """
    loop = None
    if not wait:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
    while True:
        if kill:
            kill_members(path)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY and not is_cgroupfs(path):
                shutil.rmtree(path, ignore_errors=True)
                return
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("could not remove cgroup %s: %s", path, exc.strerror)
                return
        attempts -= 1
        if attempts <= 0:
            break
        if loop is not None:
            loop.call_later(0.02, remove_dir, path, attempts)
            return
        time.sleep(0.02)
    log.warning("could not remove cgroup %s: processes are still in it", path)


def remove_tree(base: Path) -> None:
    """Remove a runtime's cgroup and whatever worker cgroups are still below it (shutdown)."""
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            if child.is_dir():
                remove_dir(child, wait=True, kill=True)
    remove_dir(base, wait=True)


def kill_members(path: Path) -> None:
    """SIGKILL every process in a cgroup (v1, or v2 without cgroup.kill)."""
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def is_cgroupfs(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [
                (line.split()[4], line.split(" - ")[1].split()[0]) for line in f if " - " in line
            ]
    except OSError:
        return False
    covering = [m for m in mounts if str(path).startswith(m[0])]
    best = max(covering, key=lambda m: len(m[0]), default=None)
    return best is not None and best[1] in ("cgroup", "cgroup2")


def sweep_stale(parent: Path) -> None:
    """Remove ``omni-<pid>`` cgroups left by runtimes that are gone (killed, say)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name.removeprefix("omni-")
        if not (entry.name.startswith("omni-") and pid.isdigit() and entry.is_dir()):
            continue
        if int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        remove_tree(entry)


def own_cgroup(controller: str | None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup path in the v2 hierarchy (None) or a v1 controller's."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            return path
    return "/"
