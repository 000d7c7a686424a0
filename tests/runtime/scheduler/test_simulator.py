"""The simulator on traces small enough to work out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni_runtime.scheduler.simulator import (
    SimulationOptions,
    TraceError,
    plan,
    read_trace,
    simulate,
)

GiB = 1 << 30


def write(tmp_path: Path, rows: list[str], header: str = "time,model,duration,memory") -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_first_load_from_disk_then_resident(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, ["0,a,1,1GiB", "10,a,1,1GiB"]))
    result = simulate(trace, SimulationOptions(), gpus=1)
    # 1 GiB at 2 GB/s: the first request waits for the load; the second finds it resident.
    assert result.waits == pytest.approx([GiB / 2e9, 0.0])
    assert result.slo_attainment == 1.0
    assert (result.cold_starts, result.evictions) == (1, 0)
    assert result.p99_wait == pytest.approx(GiB / 2e9)


def test_eviction_and_reload_over_pcie(tmp_path: Path) -> None:
    # Two 60 GB models, one 100 GB GPU: they take turns. A first load takes 60/60 = 1 s, a
    # reload from host memory 60/120 = 0.5 s.
    rows = ["0,a,1,60000000000", "10,b,1,60000000000", "20,a,1,60000000000"]
    trace = read_trace(write(tmp_path, rows))
    options = SimulationOptions(gpu_memory=100_000_000_000, disk_gbps=60, pcie_gbps=120)
    for policy in ("omni", "lru"):
        result = simulate(trace, options, gpus=1, policy=policy)
        assert result.waits == pytest.approx([1.0, 1.0, 0.5]), policy
        assert (result.cold_starts, result.evictions) == (3, 2), policy
    static = simulate(trace, options, gpus=1, policy="static")  # b never fits beside a
    assert static.waits[0] == 0 and static.waits[2] == 0 and static.waits[1] == float("inf")
    assert static.slo_attainment == pytest.approx(2 / 3)
    report = plan(trace, options)
    assert report["gpus"] == 1 and report["baseline_gpus"] == 2
    assert report["baseline_slo_attainment"] == 1.0
    assert report["evictions"] == 2 and report["cold_starts"] == 3


def test_a_full_gpu_queues_and_a_second_replica_takes_the_overflow(tmp_path: Path) -> None:
    # Three 10 s requests at once on a GPU that runs two at a time.
    trace = read_trace(write(tmp_path, ["0,a,10,1000", "0,a,10,1000", "0,a,10,1000"]))
    options = SimulationOptions(max_batch=2)
    one = simulate(trace, options, gpus=1)
    assert sorted(one.waits) == pytest.approx([1000 / 2e9] * 2 + [10.0], abs=1e-6)
    assert one.slo_attainment == pytest.approx(2 / 3)
    two = simulate(trace, options, gpus=2)  # the autoscaler panics: a replica on each GPU
    assert max(two.waits) < 1e-5
    assert two.cold_starts == 2
    report = plan(trace, options)
    assert report["gpus"] == 2
    assert report["meets_target"] is True


def test_cli_prints_the_contract_keys(tmp_path: Path) -> None:
    path = write(tmp_path, ["0,a,1,1GiB", "0.5,b,1,2GiB", "10,a,1,1GiB"])
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in (
        "requests", "models", "gpus", "slo_attainment", "baseline_gpus",
        "baseline_slo_attainment", "cold_starts", "evictions", "p99_wait_seconds",
    ):  # fmt: skip
        assert key in result, key
    assert (result["requests"], result["models"], result["gpus"]) == (3, 2, 1)
    assert result["baseline_gpus"] == 2
    table = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(path), "--gpus", "1"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "SLO attainment" in table and "one model per GPU" in table


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["0,a,1,1GiB", "x,a,1,1GiB"], None, ":3: column 'time': expected seconds, got 'x'"),
        (["0,a,0,1GiB"], None, ":2: column 'duration': must be above 0"),
        (["0,a,1,lots"], None, ":2: column 'memory': expected a size"),
        (["0,,1,1GiB"], None, ":2: column 'model' is empty"),
        (["0,a"], None, ":2: column 'duration' is missing"),
        (["0,a,1"], "time,model,duration", ":1: the header lacks column memory"),
        (["-1,a,1,1GiB"], None, ":2: column 'time': must be at least 0"),
    ],
)
def test_a_bad_row_names_file_line_and_column(
    tmp_path: Path, rows: list[str], header: str | None, message: str
) -> None:
    path = write(tmp_path, rows, header or "time,model,duration,memory")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert str(path) + message in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "1.5"], "--target must be a fraction in (0, 1]"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--gpu-memory", "big"], "--gpu-memory: expected a size"),
        (["--slo=-2s"], "--slo: expected a duration"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpu-memory", "1GiB"], "model 'a' needs 2 GiB, more than --gpu-memory 1 GiB"),
    ],
)
def test_options_out_of_range_name_the_option(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = write(tmp_path, ["0,a,1,2GiB"])
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(path), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
