"""CUDA 12 and 13 signatures of cuMemAdvise and cuMemPrefetchAsync."""

from __future__ import annotations

import pytest

from tests.cstub.conftest import Scenario


@pytest.mark.parametrize(
    ("version", "device_calls", "location_calls"),
    [("12040", "2", "0"), ("12080", "2", "0"), ("13000", "0", "2"), ("13020", "0", "2")],
)
def test_prefetch_and_advice_use_the_drivers_signature(
    run_driver: Scenario, version: str, device_calls: str, location_calls: str
) -> None:
    out = run_driver("prefetch", 4096, 2, FAKE_CUDA_VERSION=version)
    assert (out["to_host_rc"], out["to_device_rc"]) == ("0", "0")
    assert (out["fake_prefetch_to_host"], out["fake_prefetch_to_gpu"]) == ("2", "2")
    assert out["fake_advise_device_calls"] == device_calls
    assert out["fake_advise_location_calls"] == location_calls
    assert out["fake_prefetch_location_calls"] == str(2 * int(location_calls))
    assert out["fake_bad_locations"] == "0"


def test_device_mode_memory_is_not_prefetched(run_driver: Scenario) -> None:
    out = run_driver("prefetch", 4096, 2, OMNI_CUDA_MODE="device")
    assert out["fake_prefetch_device_calls"] == "0"
