"""The simulator on traces small enough to work out by hand."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni_runtime.scheduler.replay import SimulationOptions, TraceError, TraceRequest, simulate
from omni_runtime.scheduler.simulator import parse_options, plan, read_trace

GiB = 1 << 30


def write(tmp_path: Path, rows: list[str], header: str = "time,model,duration,memory") -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_header_with_a_bom_and_capitals_is_read(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes("\ufeffTime,Model,Duration,Memory\n0,a,1,1GiB\n".encode())
    assert read_trace(path) == [TraceRequest(0.0, "a", 1.0, 1 << 30)]


def test_first_load_from_disk_then_resident(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, ["0,a,1,1GiB", "10,a,1,1GiB"]))
    result = simulate(trace, SimulationOptions(), gpus=1)
    # 1 GiB at 2 GB/s: the first request waits for the load; the second finds it resident.
    assert result.waits == pytest.approx([GiB / 2e9, 0.0])
    assert result.slo_attainment == 1.0
    assert (result.cold_starts, result.evictions) == (1, 0)
    assert result.p99_wait == pytest.approx(GiB / 2e9)


def test_overcommit_pages_in_over_pcie(tmp_path: Path) -> None:
    # Two 60 GB models on one 100 GB GPU, promised 4x its memory (the default): both stay
    # loaded, and the card pages one in over PCIe when its turn comes (60/120 = 0.5 s). A
    # first load from disk takes 60/60 = 1 s.
    rows = ["0,a,1,60000000000", "10,b,1,60000000000", "20,a,1,60000000000"]
    trace = read_trace(write(tmp_path, rows))
    options = SimulationOptions(gpu_memory=100_000_000_000, disk_gbps=60, pcie_gbps=120)
    result = simulate(trace, options, gpus=1)
    assert result.waits == pytest.approx([1.0, 1.0, 0.5])
    assert (result.cold_starts, result.evictions, result.wakes) == (2, 0, 0)


def config(tmp_path: Path, text: str) -> SimulationOptions:
    path = tmp_path / "omni.toml"
    path.write_text(text)
    return parse_options(gpu_memory="100GB", disk_gbps=60, pcie_gbps=120, config=path)


def test_without_overcommit_a_model_is_parked_and_woken(tmp_path: Path) -> None:
    # gpu_overcommit 1 (from the deployment's omni.toml): b needs a's room. The host has room
    # for a's 60 GB, so a is parked, not stopped, and woken over PCIe when it is asked again.
    rows = ["0,a,1,60000000000", "10,b,1,60000000000", "20,a,1,60000000000"]
    trace = read_trace(write(tmp_path, rows))
    options = config(tmp_path, "[scheduler]\ngpu_overcommit = 1.0\nhost_memory = '200GB'\n")
    result = simulate(trace, options, gpus=1)
    # b waits for the next tick's decision (under 1 s) plus its load; a for its wake.
    assert result.waits[0] == pytest.approx(1.0)
    assert 1.0 <= result.waits[1] <= 2.0
    assert 0.5 <= result.waits[2] <= 1.5
    assert (result.cold_starts, result.evictions, result.wakes) == (2, 2, 1)


def test_without_host_room_an_evicted_model_starts_again_from_disk(tmp_path: Path) -> None:
    rows = ["0,a,1,60000000000", "10,b,1,60000000000", "20,a,1,60000000000"]
    trace = read_trace(write(tmp_path, rows))
    options = config(tmp_path, "[scheduler]\ngpu_overcommit = 1.0\nhost_memory = '10GB'\n")
    result = simulate(trace, options, gpus=1)
    assert result.waits[0] == pytest.approx(1.0)
    assert 1.0 <= result.waits[2] <= 2.0  # a fresh start from disk, not a wake
    assert (result.cold_starts, result.evictions, result.wakes) == (3, 2, 0)


def test_the_deployments_scaling_applies(tmp_path: Path) -> None:
    # The runtime's default idle_timeout (5 min) keeps a warm between its two requests; an
    # omni.toml that sets 5 s for it makes the second request a cold start again.
    trace = read_trace(write(tmp_path, ["0,a,1,1000000000", "60,a,1,1000000000"]))
    defaults = simulate(trace, SimulationOptions(gpus=0), gpus=0)
    assert defaults.cold_starts == 1
    options = config(tmp_path, "[models.a.scaling]\nidle_timeout = '5s'\n")
    options = dataclasses.replace(options, gpus=0)
    assert simulate(trace, options, gpus=0).cold_starts == 2


def test_a_cpu_node_is_bounded_by_host_memory(tmp_path: Path) -> None:
    # Two 600 MB models on a 1 GB node, sync engines (one request at a time), 0.2 s starts.
    rows = ["0,a,1,600MB", "0,a,1,600MB", "5,b,1,600MB", "10,a,1,600MB"]
    trace = read_trace(write(tmp_path, rows))
    options = parse_options(gpus=0, host_memory="1GB", start_seconds="0.2s")
    result = simulate(trace, options, gpus=0)
    # The second request waits for the first (1 s); b evicts the idle a; a comes back cold.
    assert result.waits[:2] == pytest.approx([0.2, 1.2])
    assert (result.cold_starts, result.evictions) == (3, 2)
    concurrent = simulate(trace, dataclasses.replace(options, concurrency=2), gpus=0)
    assert concurrent.waits[:2] == pytest.approx([0.2, 0.2])


def test_replicas_hold_the_traces_memory_whatever_they_declare(tmp_path: Path) -> None:
    # a declares 900 MB (omni.toml) and holds 300 MB (the trace): once its first replica is
    # measured, a second one fits beside it on a 1 GB node, as it would live.
    rows = ["0,a,1,300MB", "5,a,20,300MB", "5,a,20,300MB", "5,a,20,300MB"]
    trace = read_trace(write(tmp_path, rows))
    options = dataclasses.replace(
        config(tmp_path, "[models.a.resources]\nmemory = '900MB'\n"),
        gpus=0,
        host_memory=1_000_000_000,
    )
    result = simulate(trace, options, gpus=0)
    assert result.cold_starts == 2  # with 900 MB reserved each, only one would ever fit


def test_a_config_naming_a_model_the_trace_lacks_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, ["0,a,1,1GiB"])
    (tmp_path / "omni.toml").write_text("[models.typo.scaling]\nmax_replicas = 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(path),
         "--config", str(tmp_path / "omni.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert '[models."typo"] names a model the trace does not have' in done.stderr
    assert str(tmp_path / "omni.toml") in done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.a.resources]\nmemory = 'lots'\n", "field 'models.a.resources.memory'"),
        (
            "[models.a.scaling]\nmin_replicas = 3\nmax_replicas = 2\n",
            "scaling.min_replicas (3, from",
        ),
        ("[scheduler]\npanic_window = '90s'\n", "panic_window (90s) must not be longer"),
    ],
)
def test_a_bad_config_names_file_table_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, ["0,a,1,1GiB"])
    (tmp_path / "omni.toml").write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(path), "--gpus", "1",
         "--config", str(tmp_path / "omni.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and "omni.toml" in done.stderr


def test_static_placement_is_loaded_before_the_first_request(tmp_path: Path) -> None:
    rows = ["0,a,1,60000000000", "10,b,1,60000000000", "20,a,1,60000000000"]
    trace = read_trace(write(tmp_path, rows))
    options = config(tmp_path, "[scheduler]\ngpu_overcommit = 1.0\n")
    static = simulate(trace, options, gpus=1, policy="static")  # b never fits beside a
    assert static.waits[0] == 0 and static.waits[2] == 0 and static.waits[1] == float("inf")
    assert static.slo_attainment == pytest.approx(2 / 3)
    report = plan(trace, options)
    assert report["gpus"] == 1 and report["baseline_gpus"] == 2
    assert report["baseline_slo_attainment"] == 1.0


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
        (["--gpus=-1"], "--gpus must be 0 (a CPU node) or more"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--host-memory", "much"], "--host-memory: expected a size"),
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
