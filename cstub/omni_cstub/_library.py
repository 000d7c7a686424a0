"""Where libomnicuda.so is, and its cffi binding (ABI mode: the very file the hooks run from)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

LIBRARY_NAME = "libomnicuda.so"

# Mirrors cstub/src/omnicuda.h.
CDEF = """
struct omni_usage {
    uint64_t pid;
    uint64_t quota;
    uint64_t used;
    uint64_t peak;
    uint64_t count;
    uint64_t failures;
};
void *omni_torch_alloc(ssize_t size, int device, void *stream);
void omni_torch_free(void *ptr, ssize_t size, int device, void *stream);
void *omni_ort_alloc(size_t size);
void omni_ort_free(void *ptr);
void omni_ort_empty_cache(void);
int omni_set_quota(uint64_t bytes);
void omni_get_usage(struct omni_usage *out);
int omni_mode_is_managed(void);
int omni_mem_get_info(size_t *free_bytes, size_t *total_bytes);
int omni_driver_version(void);
int omni_prefetch_to_device(int device);
int omni_prefetch_to_host(void);
"""


def library_path() -> Path:
    """The absolute path of the built libomnicuda.so (for LD_PRELOAD and pluggable allocators)."""
    path = Path(__file__).resolve().parent / LIBRARY_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall omni-cstub (pip install ./cstub) on a machine with a "
            "C compiler so the package build can compile it"
        )
    return path


@cache
def load() -> tuple[Any, Any]:
    """The cffi FFI and the loaded library; loading it starts the hooks in this process."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(library_path()))
