"""libomnicuda against the real driver; skipped unless cuInit succeeds on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs in a fresh process: makes the primary context current, then allocates through the hooks.
SCRIPT = r"""
import ctypes, sys
from omni_cstub import Hooks
cuda = ctypes.CDLL("libcuda.so.1")
device, context = ctypes.c_int(), ctypes.c_void_p()
assert cuda.cuInit(0) == 0
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0
assert cuda.cuCtxSetCurrent(context) == 0
free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
hooks = Hooks()
mib = 1 << 20
first = hooks.lib.omni_ort_alloc(192 * mib)
refused = hooks.lib.omni_ort_alloc(128 * mib)
hook_free, hook_total = hooks.mem_info()
hooks.prefetch_to_host()
hooks.prefetch_to_device(0)
assert cuda.cuCtxSynchronize() == 0
usage = hooks.usage()
hooks.lib.omni_ort_free(first)
print(f"physical_total={total.value}")
print(f"first_ok={int(first != hooks._ffi.NULL)}")
print(f"refused={int(refused == hooks._ffi.NULL)}")
print(f"total={hook_total}")
print(f"free={hook_free}")
print(f"used={usage.used}")
print(f"failures={usage.failures}")
print(f"after={hooks.usage().used}")
"""


def run(**env: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("mode", ["managed", "device"])
def test_quota_and_memory_info_on_the_real_driver(mode: str) -> None:
    out = run(OMNI_GPU_MEMORY_LIMIT="256MiB", OMNI_CUDA_MODE=mode)
    assert (out["first_ok"], out["refused"]) == ("1", "1")
    assert out["total"] == str(min(256 << 20, int(out["physical_total"])))
    assert out["free"] == str(64 << 20)
    assert (out["used"], out["failures"], out["after"]) == (str(192 << 20), "1", "0")


def test_memory_info_never_goes_negative_when_over_committed() -> None:
    out = run(OMNI_GPU_MEMORY_LIMIT="1TiB")
    assert out["total"] == out["physical_total"]
    assert int(out["free"]) >= 0
