"""CUDA allocation hooks: per-process GPU memory quotas, managed-memory over-commit, prefetch."""

from __future__ import annotations

from omni_cstub._env import parse_size, preload_env
from omni_cstub._hooks import CudaError, Hooks
from omni_cstub._library import library_path
from omni_cstub._usage import Usage, cleanup_stale, read_usage, region_path

__all__ = [
    "CudaError",
    "Hooks",
    "Usage",
    "cleanup_stale",
    "library_path",
    "parse_size",
    "preload_env",
    "read_usage",
    "region_path",
]
