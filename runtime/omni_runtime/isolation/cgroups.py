"""A cgroup per worker with the model's memory, CPU and pid limits; v2 and v1 hierarchies.

Worker cgroups live under the runtime's own cgroup, so they also stay inside whatever limit the
runtime itself runs under:

    v2: <root>/<runtime's cgroup>/omni-<runtime pid>/<worker>
    v1: <root>/<controller>/<runtime's cgroup in it>/omni-<runtime pid>/<worker>

After a worker dies, ``oom_killed()`` tells whether the kernel's OOM killer ended it, so the
runtime can say "model X exceeded its memory limit of 2 GiB" rather than "killed by SIGKILL".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from omni_runtime.isolation.cgroupfs import DEFAULT_ROOT, CgroupError, own_cgroup, read_int
from omni_runtime.isolation.cgroups_v1 import CgroupsV1
from omni_runtime.isolation.cgroups_v2 import CgroupsV2
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
        DEFAULT_ROOT / own_cgroup(None).lstrip("/") / "memory.max",
        DEFAULT_ROOT / "memory" / own_cgroup("memory").lstrip("/") / "memory.limit_in_bytes",
    ]
    for limit in limits:
        value = read_int(limit, 0)
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
