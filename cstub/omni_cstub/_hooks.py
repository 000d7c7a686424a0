"""The hooks as seen from inside the process that loaded them."""

from __future__ import annotations

from typing import Any

from omni_cstub._env import parse_size
from omni_cstub._library import library_path, load
from omni_cstub._usage import Usage


class CudaError(RuntimeError):
    """A driver call made by the hooks failed; code is the CUresult."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} failed with CUDA error {code}")
        self.code = code


class Hooks:
    """libomnicuda loaded in this process: its counters, quota, prefetch and allocator entries."""

    def __init__(self) -> None:
        self._ffi, self._lib = load()

    @property
    def lib(self) -> Any:
        """The cffi library object, for calling the C API directly."""
        return self._lib

    def usage(self) -> Usage:
        out = self._ffi.new("struct omni_usage *")
        self._lib.omni_get_usage(out)
        return Usage(
            pid=out.pid,
            quota=out.quota,
            used=out.used,
            peak=out.peak,
            count=out.count,
            failures=out.failures,
        )

    def set_quota(self, quota: int | str | None) -> None:
        """Sets this process's quota; None or 0 removes it. Live allocations stay."""
        self._lib.omni_set_quota(0 if quota is None else parse_size(quota))

    @property
    def managed(self) -> bool:
        return bool(self._lib.omni_mode_is_managed())

    def mem_info(self) -> tuple[int, int]:
        """(free, total) as cuMemGetInfo reports them to the hooked process."""
        free = self._ffi.new("size_t *")
        total = self._ffi.new("size_t *")
        self._check("cuMemGetInfo", self._lib.omni_mem_get_info(free, total))
        return free[0], total[0]

    def prefetch_to_device(self, device: int = 0) -> None:
        """Queues every managed allocation of this process for migration to the GPU."""
        self._check(f"prefetch to GPU {device}", self._lib.omni_prefetch_to_device(device))

    def prefetch_to_host(self) -> None:
        """Queues every managed allocation of this process for migration to host memory."""
        self._check("prefetch to host", self._lib.omni_prefetch_to_host())

    def torch_allocator_paths(self) -> tuple[str, str, str]:
        """(path, alloc, free) for torch.cuda.memory.CUDAPluggableAllocator."""
        return str(library_path()), "omni_torch_alloc", "omni_torch_free"

    def ort_allocator_addresses(self) -> dict[str, int]:
        """Addresses for onnxruntime's CUDA provider gpu_external_alloc/free/empty_cache."""
        return {
            "gpu_external_alloc": self._address(self._lib.omni_ort_alloc),
            "gpu_external_free": self._address(self._lib.omni_ort_free),
            "gpu_external_empty_cache": self._address(self._lib.omni_ort_empty_cache),
        }

    def _address(self, function: Any) -> int:
        return int(self._ffi.cast("uintptr_t", function))

    @staticmethod
    def _check(what: str, code: int) -> None:
        if code != 0:
            raise CudaError(what, code)
