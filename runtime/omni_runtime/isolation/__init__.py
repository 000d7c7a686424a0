"""Isolation of model workers: cgroups (v1 and v2) and, where allowed, mount namespaces."""

from __future__ import annotations

from omni_runtime.isolation.cgroups import (
    CgroupError,
    Cgroups,
    CgroupsV1,
    CgroupsV2,
    WorkerCgroup,
    detect_cgroups,
    node_memory_bytes,
)
from omni_runtime.isolation.plan import Isolation

__all__ = [
    "Isolation",
    "CgroupError",
    "Cgroups",
    "CgroupsV1",
    "CgroupsV2",
    "WorkerCgroup",
    "detect_cgroups",
    "node_memory_bytes",
]
