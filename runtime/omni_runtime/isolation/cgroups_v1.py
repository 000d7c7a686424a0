"""cgroup v1: a hierarchy per controller (memory, cpu, pids), a directory per worker in each."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from omni_runtime.isolation.cgroupfs import (
    CPU_PERIOD_US,
    DEFAULT_PIDS_MAX,
    DEFAULT_ROOT,
    CgroupError,
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


class _V1Worker:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.path = paths.get("memory") or next(iter(paths.values()))

    @property
    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths.values()]

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            write(path / "cgroup.procs", str(pid))

    def kill(self) -> None:
        kill_members(self.path)

    def oom_killed(self) -> bool:
        memory = self.paths.get("memory")
        return memory is not None and read_keyed(memory / "memory.oom_control", "oom_kill") > 0

    def memory_bytes(self) -> int:
        """Its working set: usage less the page cache the kernel may take back at once."""
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        used = read_int(memory / "memory.usage_in_bytes")
        return max(0, used - read_keyed(memory / "memory.stat", "total_inactive_file"))

    def remove(self) -> None:
        for path in self.paths.values():
            remove_dir(path)


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
            own = (parents or {}).get(controller) or own_cgroup(controller)
            base = mount / own.lstrip("/") / f"omni-{os.getpid()}"
            sweep_stale(base.parent)
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
            write(memory / "memory.limit_in_bytes", str(resources.memory))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                # Without this the limit only pushes the worker into swap.
                with contextlib.suppress(CgroupError):
                    write(memory / "memory.memsw.limit_in_bytes", str(resources.memory))
        if "cpu" in paths:
            write(paths["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            write(paths["cpu"] / "cpu.cfs_quota_us", str(int(resources.cpus * CPU_PERIOD_US)))
        if "pids" in paths:
            write(paths["pids"] / "pids.max", str(DEFAULT_PIDS_MAX))
        return _V1Worker(paths)

    def close(self) -> None:
        for base in self.bases.values():
            remove_tree(base)
