"""Scenarios for the in-process front ends, run by the tests in a fresh interpreter."""

from __future__ import annotations

import os
import sys

from cffi import FFI

from omni_cstub import Hooks, read_usage, region_path

MIB = 1 << 20


def fake_counter(name: str) -> int:
    ffi = FFI()
    ffi.cdef("long long fake_cuda_counter(const char *name);")
    return int(ffi.dlopen("libcuda.so.1").fake_cuda_counter(name.encode()))


def torch(hooks: Hooks) -> dict[str, object]:
    ffi = FFI()
    ffi.cdef(
        "void *omni_torch_alloc(ssize_t, int, void *);"
        "void omni_torch_free(void *, ssize_t, int, void *);"
    )
    path, alloc_name, free_name = hooks.torch_allocator_paths()
    lib = ffi.dlopen(path)
    alloc, free = getattr(lib, alloc_name), getattr(lib, free_name)
    first = alloc(3 * MIB, 0, ffi.NULL)
    second = alloc(3 * MIB, 0, ffi.NULL)
    usage_full = hooks.usage()
    free(first, 3 * MIB, 0, ffi.NULL)
    usage_after = hooks.usage()
    return {
        "first_null": first == ffi.NULL,
        "second_null": second == ffi.NULL,
        "used_full": usage_full.used,
        "failures": usage_full.failures,
        "used_after": usage_after.used,
        "managed_allocs": fake_counter("managed_allocs"),
    }


def ort(hooks: Hooks) -> dict[str, object]:
    ffi = FFI()
    addresses = hooks.ort_allocator_addresses()
    alloc = ffi.cast("void *(*)(size_t)", addresses["gpu_external_alloc"])
    free = ffi.cast("void (*)(void *)", addresses["gpu_external_free"])
    empty_cache = ffi.cast("void (*)(void)", addresses["gpu_external_empty_cache"])
    first = alloc(3 * MIB)
    refused = alloc(3 * MIB)
    used_full = hooks.usage().used
    free(first)
    empty_cache()
    return {
        "first_null": first == ffi.NULL,
        "refused_null": refused == ffi.NULL,
        "used_full": used_full,
        "used_after": hooks.usage().used,
        "frees": fake_counter("frees"),
    }


def prefetch(hooks: Hooks) -> dict[str, object]:
    ffi = FFI()
    kept = [hooks.lib.omni_ort_alloc(MIB) for _ in range(2)]
    hooks.prefetch_to_host()
    hooks.prefetch_to_device(0)
    try:
        hooks.prefetch_to_device(-1)
        negative = "accepted"
    except Exception as exc:
        negative = type(exc).__name__
    return {
        "kept": sum(p != ffi.NULL for p in kept),
        "to_host": fake_counter("prefetch_to_host"),
        "to_gpu": fake_counter("prefetch_to_gpu"),
        "negative_device": negative,
    }


def worker_prefetch(hooks: Hooks) -> dict[str, object]:
    """The runtime's PREFETCH frames, as a worker that loaded the hooks handles them."""
    from types import SimpleNamespace

    from omni_sdk.wire import Kind
    from omni_sdk.worker import split_frames

    ffi = FFI()
    kept = [hooks.lib.omni_ort_alloc(MIB) for _ in range(3)]
    runner = SimpleNamespace(model_name="@test/gpu", batch_size=1)
    frames = [(Kind.PREFETCH, 0, 0, b"host"), (Kind.PING, 0, 7, b"")]
    batch, _, control, rest, stopping = split_frames(runner, frames, None)  # type: ignore[arg-type]
    to_host = fake_counter("prefetch_to_host")
    split_frames(runner, [(Kind.PREFETCH, 0, 0, b"device")], None)  # type: ignore[arg-type]
    return {
        "kept": sum(p != ffi.NULL for p in kept),
        "to_host": to_host,
        "to_gpu": fake_counter("prefetch_to_gpu"),
        "answered_ping": len(control) == 1 and not batch and not rest and not stopping,
    }


def quota_api(hooks: Hooks) -> dict[str, object]:
    ffi = FFI()
    before = hooks.mem_info()
    hooks.set_quota("1MiB")
    refused = hooks.lib.omni_ort_alloc(2 * MIB) == ffi.NULL
    hooks.set_quota(None)
    allowed = hooks.lib.omni_ort_alloc(2 * MIB) != ffi.NULL
    region = read_usage(region_path(os.getpid()))
    usage = hooks.usage()
    return {
        "before_total": before[1],
        "refused": refused,
        "allowed": allowed,
        "managed": hooks.managed,
        "region_matches": region == usage,
        "region_used": region.used,
    }


SCENARIOS = {
    "torch": torch,
    "ort": ort,
    "prefetch": prefetch,
    "quota_api": quota_api,
    "worker_prefetch": worker_prefetch,
}

if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]](Hooks())
    for key, value in result.items():
        print(f"{key}={value}")
