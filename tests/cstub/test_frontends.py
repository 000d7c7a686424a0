"""The PyTorch and ONNX Runtime front ends and the Python API, called through cffi."""

from __future__ import annotations

import omni_cstub
from tests.cstub.conftest import Scenario


def test_torch_signature_enforces_the_quota(run_python: Scenario) -> None:
    out = run_python("torch", OMNI_GPU_MEMORY_LIMIT="4MiB")
    assert (out["first_null"], out["second_null"]) == ("False", "True")
    assert (out["used_full"], out["failures"], out["used_after"]) == (str(3 << 20), "1", "0")
    assert out["managed_allocs"] == "1"


def test_ort_addresses_are_callable_allocator_functions(run_python: Scenario) -> None:
    out = run_python("ort", OMNI_GPU_MEMORY_LIMIT="4MiB")
    assert (out["first_null"], out["refused_null"]) == ("False", "True")
    assert (out["used_full"], out["used_after"], out["frees"]) == (str(3 << 20), "0", "1")


def test_prefetch_wrappers_move_every_managed_allocation(run_python: Scenario) -> None:
    out = run_python("prefetch", FAKE_CUDA_VERSION="13000")
    assert out["kept"] == "2"
    assert (out["to_host"], out["to_gpu"]) == ("2", "2")
    assert out["negative_device"] == "CudaError"


def test_a_worker_moves_its_memory_where_the_runtime_says(run_python: Scenario) -> None:
    # LD_PRELOAD names the hooks, as it does in a CUDA worker; the script never allocates
    # through the driver directly, so only the prefetch calls move anything.
    out = run_python(
        "worker_prefetch",
        FAKE_CUDA_VERSION="13000",
        LD_PRELOAD=str(omni_cstub.library_path()),
    )
    assert out["kept"] == "3"
    assert (out["to_host"], out["to_gpu"]) == ("3", "3")
    assert out["answered_ping"] == "True"


def test_quota_can_be_set_at_run_time_and_the_region_matches(run_python: Scenario) -> None:
    out = run_python("quota_api", FAKE_CUDA_TOTAL="123456789")
    assert out["before_total"] == "123456789"
    assert (out["refused"], out["allowed"], out["managed"]) == ("True", "True", "True")
    assert (out["region_matches"], out["region_used"]) == ("True", str(2 << 20))
