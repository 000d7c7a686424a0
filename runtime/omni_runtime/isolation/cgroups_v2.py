"""cgroup v2, the unified hierarchy: a directory per worker, with its memory, CPU and pid limits."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from omni_runtime.isolation.cgroupfs import (
    CPU_PERIOD_US,
    DEFAULT_PIDS_MAX,
    DEFAULT_ROOT,
    CgroupError,
    is_cgroupfs,
    kill_members,
    own_cgroup,
    read_int,
    read_keyed,
    remove_dir,
    remove_tree,
    sweep_stale,
    write,
)
from omni_sdk import Resources

log = logging.getLogger("omni.isolation")


class _V2Worker:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def add(self, pid: int) -> None:
        write(self.path / "cgroup.procs", str(pid))

    def kill(self) -> None:
        if (self.path / "cgroup.kill").exists() and is_cgroupfs(self.path):
            with contextlib.suppress(CgroupError):
                write(self.path / "cgroup.kill", "1")
        else:
            kill_members(self.path)

    def oom_killed(self) -> bool:
        return read_keyed(self.path / "memory.events", "oom_kill") > 0

    def memory_bytes(self) -> int:
        """Its working set: usage less the page cache the kernel may take back at once."""
        used = read_int(self.path / "memory.current")
        return max(0, used - read_keyed(self.path / "memory.stat", "inactive_file"))

    def remove(self) -> None:
        remove_dir(self.path)


class CgroupsV2:
    """The unified hierarchy: one directory per worker, controllers enabled on the way down."""

    version = "v2"

    def __init__(self, root: Path = DEFAULT_ROOT, parent: str | None = None) -> None:
        self.root = root
        own = own_cgroup(None) if parent is None else parent
        own_dir = root / own.lstrip("/")
        self.base = own_dir / f"omni-{os.getpid()}"
        self._own_dir = own_dir
        self._leaf: Path | None = None
        sweep_stale(own_dir)
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
            write(self._leaf / "cgroup.procs", str(os.getpid()))
        self.base.mkdir(parents=True, exist_ok=True)
        for directory in (self.base.parent, self.base):
            if enable:
                write(directory / "cgroup.subtree_control", enable)

    def create(self, name: str, resources: Resources) -> _V2Worker:
        path = self.base / name
        path.mkdir(exist_ok=True)
        if "memory" in self.controllers:
            write(path / "memory.max", str(resources.memory))
            if (path / "memory.swap.max").exists():
                write(path / "memory.swap.max", "0")
            write(path / "memory.oom.group", "1")
        if "cpu" in self.controllers:
            write(path / "cpu.max", f"{int(resources.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if "pids" in self.controllers:
            write(path / "pids.max", str(DEFAULT_PIDS_MAX))
        return _V2Worker(path)

    def close(self) -> None:
        remove_tree(self.base)
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
                write(self._own_dir / "cgroup.subtree_control", disable)
            write(self._own_dir / "cgroup.procs", str(os.getpid()))
        except CgroupError as exc:
            log.debug("staying in %s: %s", leaf, exc)
            return
        remove_dir(leaf, wait=True)
