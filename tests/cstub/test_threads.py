"""Concurrent allocations: the counters are exact when every thread is done."""

from __future__ import annotations

import shutil

import pytest

from tests.cstub.conftest import Scenario


def test_counters_are_exact_after_many_threads(run_driver: Scenario) -> None:
    threads, rounds, size, keep = 32, 2000, 1000, 4
    out = run_driver("threads", threads, rounds, size, keep, OMNI_GPU_MEMORY_LIMIT="1GiB")
    live = threads * keep * size
    assert out["errors"] == "0"
    assert (out["used"], out["count"], out["fake_live_bytes"]) == (str(live), "128", str(live))
    assert int(out["peak"]) >= live
    assert (out["final_used"], out["final_count"], out["final_live"]) == ("0", "0", "0")


def test_quota_holds_under_contention(run_driver: Scenario) -> None:
    out = run_driver("threads", 16, 0, 100_000, 8, OMNI_GPU_MEMORY_LIMIT="1000000")
    assert out["used"] == "1000000"  # exactly 10 of the 128 allocations fit
    assert (out["count"], out["failures"], out["errors"]) == ("10", "118", "118")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_threaded_scenario_is_clean_under_valgrind(run_driver: Scenario) -> None:
    out = run_driver(
        "threads",
        4,
        50,
        1000,
        2,
        prefix=["valgrind", "-q", "--error-exitcode=1"],
        OMNI_GPU_MEMORY_LIMIT="1MiB",
    )
    assert (out["errors"], out["final_used"]) == ("0", "0")
