"""A cgroup per worker with the model's memory, CPU and pid limits; v2 and v1 hierarchies.

Worker cgroups live under the runtime's own cgroup, so they also stay inside whatever limit the
runtime itself runs under:

    v2: <root>/<runtime's cgroup>/omni-<runtime pid>/<worker>
    v1: <root>/<controller>/<runtime's cgroup in it>/omni-<runtime pid>/<worker>

After a worker dies, ``oom_killed()`` tells whether the kernel's OOM killer ended it, so the
runtime can say "model X exceeded its memory limit of 2 GiB" rather than "killed by SIGKILL".
"""

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
from typing import Protocol

from omni_sdk import Resources

__all__ = [
    "CgroupError",
    "Cgroups",
    "CgroupsV1",
    "CgroupsV2",
    "WorkerCgroup",
    "detect_cgroups",
    "node_memory_bytes",
]

log = logging.getLogger("omni.isolation")
DEFAULT_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
DEFAULT_PIDS_MAX = 4096


class CgroupError(Exception):
    """A cgroup could not be made or configured; the message names the file."""


class WorkerCgroup(Protocol):
    """The cgroup(s) of one worker."""

    path: Path

    @property
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to join (the sandbox does, before anything)."""
        ...

    def add(self, pid: int) -> None: ...
    def kill(self) -> None: ...
    def oom_killed(self) -> bool: ...
    def memory_bytes(self) -> int:
        """Its working set (usage less inactive page cache), as kubelet counts it."""

    def remove(self) -> None: ...


class Cgroups(Protocol):
    version: str

    @property
    def controllers(self) -> list[str]: ...

    def create(self, name: str, resources: Resources) -> WorkerCgroup: ...
    def close(self) -> None: ...


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from exc


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _read_keyed(path: Path, key: str) -> int:
    """A value from a flat keyed file such as memory.events (``oom_kill 1``)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _remove_dir(path: Path, attempts: int = 100, wait: bool = False, kill: bool = False) -> None:
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
            _kill_members(path)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY and not _is_cgroupfs(path):
                shutil.rmtree(path, ignore_errors=True)
                return
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("could not remove cgroup %s: %s", path, exc.strerror)
                return
        attempts -= 1
        if attempts <= 0:
            break
        if loop is not None:
            loop.call_later(0.02, _remove_dir, path, attempts)
            return
        time.sleep(0.02)
    log.warning("could not remove cgroup %s: processes are still in it", path)


def _remove_tree(base: Path) -> None:
    """Remove a runtime's cgroup and whatever worker cgroups are still below it (shutdown)."""
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            if child.is_dir():
                _remove_dir(child, wait=True, kill=True)
    _remove_dir(base, wait=True)


def _kill_members(path: Path) -> None:
    """SIGKILL every process in a cgroup (v1, or v2 without cgroup.kill)."""
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _is_cgroupfs(path: Path) -> bool:
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


def _sweep_stale(parent: Path) -> None:
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
        _remove_tree(entry)


def _own_cgroup(controller: str | None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
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


class _V2Worker:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def kill(self) -> None:
        if (self.path / "cgroup.kill").exists() and _is_cgroupfs(self.path):
            with contextlib.suppress(CgroupError):
                _write(self.path / "cgroup.kill", "1")
        else:
            _kill_members(self.path)

    def oom_killed(self) -> bool:
        return _read_keyed(self.path / "memory.events", "oom_kill") > 0

    def memory_bytes(self) -> int:
        """Its working set: usage less the page cache the kernel may take back at once."""
        used = _read_int(self.path / "memory.current")
        return max(0, used - _read_keyed(self.path / "memory.stat", "inactive_file"))

    def remove(self) -> None:
        _remove_dir(self.path)


class CgroupsV2:
    """The unified hierarchy: one directory per worker, controllers enabled on the way down."""

    version = "v2"

    def __init__(self, root: Path = DEFAULT_ROOT, parent: str | None = None) -> None:
        self.root = root
        own = _own_cgroup(None) if parent is None else parent
        own_dir = root / own.lstrip("/")
        self.base = own_dir / f"omni-{os.getpid()}"
        self._own_dir = own_dir
        self._leaf: Path | None = None
        _sweep_stale(own_dir)
        available = (own_dir / "cgroup.controllers").read_text().split()
        self.controllers: list[str] = [c for c in ("memory", "cpu", "pids") if c in available]
        enable = " ".join(f"+{c}" for c in self.controllers)
        self._enabled: list[str] = []  # what the runtime enables in its own cgroup
        with contextlib.suppress(OSError):
            before = (own_dir / "cgroup.subtree_control").read_text().split()
            self._enabled = [c for c in self.controllers if c not in before]
        if parent is None and own != "/":
            # The kernel enables controllers for children only in a cgroup without processes of
            # its own (the root excepted), so the runtime first steps into a leaf of its own.
            self._leaf = own_dir / "omni-runtime"
            self._leaf.mkdir(exist_ok=True)
            _write(self._leaf / "cgroup.procs", str(os.getpid()))
        self.base.mkdir(parents=True, exist_ok=True)
        for directory in (self.base.parent, self.base):
            if enable:
                _write(directory / "cgroup.subtree_control", enable)

    def create(self, name: str, resources: Resources) -> _V2Worker:
        path = self.base / name
        path.mkdir(exist_ok=True)
        if "memory" in self.controllers:
            _write(path / "memory.max", str(resources.memory))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
            _write(path / "memory.oom.group", "1")
        if "cpu" in self.controllers:
            _write(path / "cpu.max", f"{int(resources.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if "pids" in self.controllers:
            _write(path / "pids.max", str(DEFAULT_PIDS_MAX))
        return _V2Worker(path)

    def close(self) -> None:
        _remove_tree(self.base)
        if self._leaf is not None:
            self._leave_leaf(self._leaf)
            self._leaf = None

    def _leave_leaf(self, leaf: Path) -> None:
        """Step back out of the leaf entered at start, and remove it, unless another runtime
        still shares it: its cgroup is then as the runtime found it."""
        others = [
            entry
            for entry in self._own_dir.iterdir()
            if entry.name.startswith("omni-")
            and entry.name.removeprefix("omni-").isdigit()
            and entry != self.base
            and Path(f"/proc/{entry.name.removeprefix('omni-')}").exists()
        ]
        try:
            members = (leaf / "cgroup.procs").read_text().split()
        except OSError:
            return
        if others or any(pid != str(os.getpid()) for pid in members):
            return
        try:
            if self._enabled:
                disable = " ".join(f"-{c}" for c in self._enabled)
                _write(self._own_dir / "cgroup.subtree_control", disable)
            _write(self._own_dir / "cgroup.procs", str(os.getpid()))
        except CgroupError as exc:
            log.debug("staying in %s: %s", leaf, exc)
            return
        _remove_dir(leaf, wait=True)


class _V1Worker:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.path = paths.get("memory") or next(iter(paths.values()))

    @property
    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths.values()]

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            _write(path / "cgroup.procs", str(pid))

    def kill(self) -> None:
        _kill_members(self.path)

    def oom_killed(self) -> bool:
        memory = self.paths.get("memory")
        return memory is not None and _read_keyed(memory / "memory.oom_control", "oom_kill") > 0

    def memory_bytes(self) -> int:
        """Its working set: usage less the page cache the kernel may take back at once."""
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        used = _read_int(memory / "memory.usage_in_bytes")
        return max(0, used - _read_keyed(memory / "memory.stat", "total_inactive_file"))

    def remove(self) -> None:
        for path in self.paths.values():
            _remove_dir(path)


class CgroupsV1:
    """One hierarchy per controller (memory, cpu, pids), a directory per worker in each."""

    version = "v1"

    def __init__(self, root: Path = DEFAULT_ROOT, parents: dict[str, str] | None = None) -> None:
        self.root = root
        self.bases: dict[str, Path] = {}
        for controller in ("memory", "cpu", "pids"):
            mount = root / controller
            if not mount.is_dir():
                continue
            own = (parents or {}).get(controller) or _own_cgroup(controller)
            base = mount / own.lstrip("/") / f"omni-{os.getpid()}"
            _sweep_stale(base.parent)
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create {base}: {exc.strerror}") from exc
            self.bases[controller] = base
        if not self.bases:
            raise CgroupError(f"no memory, cpu or pids hierarchy under {root}")

    @property
    def controllers(self) -> list[str]:
        return list(self.bases)

    def create(self, name: str, resources: Resources) -> _V1Worker:
        paths = {}
        for controller, base in self.bases.items():
            path = base / name
            path.mkdir(exist_ok=True)
            paths[controller] = path
        if "memory" in paths:
            memory = paths["memory"]
            _write(memory / "memory.limit_in_bytes", str(resources.memory))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                # Without this the limit only pushes the worker into swap.
                with contextlib.suppress(CgroupError):
                    _write(memory / "memory.memsw.limit_in_bytes", str(resources.memory))
        if "cpu" in paths:
            _write(paths["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(paths["cpu"] / "cpu.cfs_quota_us", str(int(resources.cpus * CPU_PERIOD_US)))
        if "pids" in paths:
            _write(paths["pids"] / "pids.max", str(DEFAULT_PIDS_MAX))
        return _V1Worker(paths)

    def close(self) -> None:
        for base in self.bases.values():
            _remove_tree(base)


def node_memory_bytes() -> int:
    """Memory this runtime can hand out: the machine's, or its own cgroup's limit if lower."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    limits = [
        DEFAULT_ROOT / _own_cgroup(None).lstrip("/") / "memory.max",
        DEFAULT_ROOT / "memory" / _own_cgroup("memory").lstrip("/") / "memory.limit_in_bytes",
    ]
    for limit in limits:
        value = _read_int(limit, 0)
        if 0 < value < total:
            total = value
    return total


def detect_cgroups(root: Path = DEFAULT_ROOT) -> tuple[Cgroups | None, str]:
    """The cgroup driver this machine allows, or None and the reason in one sentence."""
    if os.geteuid() != 0:
        return None, "not running as root, so workers get no cgroup limits"
    try:
        if (root / "cgroup.controllers").is_file():
            return CgroupsV2(root), "cgroup v2"
        if (root / "memory").is_dir():
            return CgroupsV1(root), "cgroup v1"
    except (CgroupError, OSError) as exc:
        return None, f"cgroups unusable ({exc}), so workers get no cgroup limits"
    return None, f"no cgroup hierarchy at {root}, so workers get no cgroup limits"
