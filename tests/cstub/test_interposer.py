"""The LD_PRELOAD front end: quota, memory info, dlsym and cuGetProcAddress, refused calls."""

from __future__ import annotations

from tests.cstub.conftest import Scenario

OUT_OF_MEMORY = "2"
NOT_SUPPORTED = "801"


def test_allocation_past_the_quota_fails_with_out_of_memory(run_driver: Scenario) -> None:
    out = run_driver("quota", 300_000, 5, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert out["ok"] == "3"
    assert out["first_error"] == OUT_OF_MEMORY
    assert (out["used"], out["count"], out["failures"]) == ("900000", "3", "2")
    assert out["after_used"] == "0"


def test_memory_info_reports_the_quota_slice(run_driver: Scenario) -> None:
    out = run_driver("quota", 300_000, 3, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert (out["total"], out["free"]) == ("1048576", str(1048576 - 900_000))
    assert (out["after_total"], out["after_free"]) == ("1048576", "1048576")


def test_memory_info_total_is_capped_by_the_card_and_free_never_negative(
    run_driver: Scenario,
) -> None:
    out = run_driver("quota", 200_000, 3, OMNI_GPU_MEMORY_LIMIT="1MiB", FAKE_CUDA_TOTAL="500000")
    assert out["ok"] == "3"  # managed memory over-commits the 500000-byte card
    assert (out["total"], out["free"]) == ("500000", "0")


def test_without_a_quota_memory_info_is_the_cards(run_driver: Scenario) -> None:
    out = run_driver("quota", 1000, 2, FAKE_CUDA_TOTAL="1000000")
    assert (out["total"], out["free"]) == ("1000000", str(1_000_000 - 2000))
    assert out["quota"] == "0"


def test_managed_mode_allocates_managed_memory_preferring_the_gpu(run_driver: Scenario) -> None:
    out = run_driver("quota", 1000, 2)
    assert (out["fake_managed_allocs"], out["fake_device_allocs"]) == ("2", "0")
    assert out["fake_last_managed_flags"] == "1"  # CU_MEM_ATTACH_GLOBAL
    assert (out["fake_advise_device_calls"], out["fake_last_advise_device"]) == ("2", "0")


def test_device_mode_passes_through_and_still_enforces_the_quota(run_driver: Scenario) -> None:
    out = run_driver("quota", 400_000, 3, OMNI_CUDA_MODE="device", OMNI_GPU_MEMORY_LIMIT="1MB")
    assert (out["fake_managed_allocs"], out["fake_device_allocs"]) == ("0", "2")
    assert (out["ok"], out["first_error"]) == ("2", OUT_OF_MEMORY)
    assert out["fake_advise_device_calls"] == "0"


def test_a_bad_setting_is_reported_and_ignored(run_driver: Scenario) -> None:
    out = run_driver("quota", 1000, 1, OMNI_GPU_MEMORY_LIMIT="lots", OMNI_CUDA_MODE="fast")
    assert out["quota"] == "0"
    assert "OMNI_GPU_MEMORY_LIMIT=lots is not a size" in out["stderr"]
    assert "OMNI_CUDA_MODE=fast is not 'managed' or 'device'" in out["stderr"]


def test_dlsym_on_libcuda_returns_the_hook(run_driver: Scenario) -> None:
    out = run_driver("dlsym", 600_000, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert (out["dlsym_rc"], out["dlsym_rc2"]) == ("0", OUT_OF_MEMORY)
    assert out["passthrough"] == "1"


def test_get_proc_address_returns_the_hooks(run_driver: Scenario) -> None:
    out = run_driver("procaddr", 300_000, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert out["lookup_rc"] == out["alloc_rc"] == "0"  # NULL symbolStatus is accepted
    assert (out["lookup2_rc"], out["status"], out["alloc2_rc"]) == ("0", "0", "0")
    assert out["via_getter_rc"] == "0"  # cuGetProcAddress looked up through itself is hooked
    assert (out["v1_rc"], out["v1_alloc_rc"]) == ("0", OUT_OF_MEMORY)
    assert (out["unknown_rc"], out["unknown_null"]) == ("0", "1")
    assert out["used"] == "900000"


def test_stream_ordered_allocations_are_refused_under_a_quota(run_driver: Scenario) -> None:
    out = run_driver("async", 1000, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert (out["async_rc"], out["async_rc2"]) == (NOT_SUPPORTED, NOT_SUPPORTED)
    assert out["fake_async_allocs"] == "0"
    assert out["stderr"].count("cuMemAllocAsync refused") == 1


def test_stream_ordered_allocations_pass_through_without_a_quota(run_driver: Scenario) -> None:
    out = run_driver("async", 1000)
    assert (out["async_rc"], out["fake_async_allocs"]) == ("0", "2")


def test_pitched_allocations_are_counted(run_driver: Scenario) -> None:
    managed = run_driver("pitch", 1000, 10, OMNI_GPU_MEMORY_LIMIT="1MiB")
    assert (managed["pitch_rc"], managed["pitch"], managed["used"]) == ("0", "1024", "10240")
    device = run_driver("pitch", 1000, 10, OMNI_CUDA_MODE="device")
    assert (device["fake_pitch_allocs"], device["used"]) == ("1", str(1024 * 10))


def test_a_driver_failure_is_returned_and_counted(run_driver: Scenario) -> None:
    out = run_driver("quota", 1000, 2, FAKE_CUDA_FAIL="cuMemAllocManaged", FAKE_CUDA_FAIL_CODE="2")
    assert (out["ok"], out["first_error"]) == ("0", OUT_OF_MEMORY)
    assert (out["used"], out["failures"]) == ("0", "2")
