"""``omni-runtime doctor``: what isolation and acceleration this machine offers."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["cgroup_version", "doctor_report"]


def cgroup_version(root: Path = Path("/sys/fs/cgroup")) -> str:
    """``"v2"``, ``"v1"``, or ``"none"``: which cgroup hierarchy is mounted at ``root``."""
    if (root / "cgroup.controllers").is_file():
        return "v2"
    if any((root / c).is_dir() for c in ("memory", "cpu", "pids")):
        return "v1"
    return "none"


def _v1_controllers(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    return sorted(c for c in ("memory", "cpu", "cpuacct", "pids") if (root / c).is_dir())


def _v2_controllers(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    try:
        return (root / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def _cuda() -> str:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no (libcuda.so.1 not found)"
    result = libcuda.cuInit(0)
    if result != 0:
        return f"no (cuInit returned {result})"
    count = ctypes.c_int(0)
    libcuda.cuDeviceGetCount(ctypes.byref(count))
    return f"yes ({count.value} device{'s' if count.value != 1 else ''})"


def _isolation() -> str:
    from omni_runtime.isolation import detect_cgroups

    cgroups, description = detect_cgroups()
    if cgroups is None:
        return description
    cgroups.close()
    return f"{description}: memory, CPU and pid limits per worker"


def sandbox_check() -> str:
    """Start the sandbox launcher for real, around /bin/true: what it says is what workers get."""
    from omni_runtime.isolation import sandbox

    if os.geteuid() != 0:
        return "no (not root): workers run as the runtime's user with a reduced environment"
    spec = json.dumps({"package": "/", "uid": 65534})
    command = [sys.executable, "-I", "-S", sandbox.__file__, spec, "--", "/bin/true"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no ({exc})"
    if result.returncode != 0:
        return f"no ({result.stderr.strip() or f'exit status {result.returncode}'})"
    return (
        "yes: a user per model, no capabilities, read-only files, private /tmp and /dev/shm, "
        "own pid and network namespaces, a seccomp filter"
    )


def doctor_report() -> dict[str, Any]:
    version = cgroup_version()
    controllers = _v2_controllers() if version == "v2" else _v1_controllers()
    namespaces = sorted(
        ns for ns in ("mnt", "pid", "net", "user") if os.path.exists(f"/proc/self/ns/{ns}")
    )
    return {
        "root": os.geteuid() == 0,
        "cgroup": version,
        "cgroup controllers": " ".join(controllers) or "none",
        "namespaces": " ".join(namespaces) or "none",
        "sandbox": sandbox_check(),
        "cuda": _cuda(),
        "worker isolation": _isolation(),
    }
