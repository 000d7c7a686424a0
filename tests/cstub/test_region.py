"""The shared usage region: its contents, removal at exit, and cleanup after a crash."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from omni_cstub import Usage, cleanup_stale, read_usage, region_path
from tests.cstub.conftest import Scenario, scenario_env


def start_holder(fake_cuda_dir: Path, driver_program: Path, **env: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [str(driver_program), "hold", "4096"],
        env=scenario_env(fake_cuda_dir, preload=True, **env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    lines = [holder.stdout.readline(), holder.stdout.readline()]
    assert lines == ["rc=0\n", "ready=1\n"]
    return holder


def kill(holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    for pipe in (holder.stdin, holder.stdout):
        if pipe is not None:
            pipe.close()


def test_region_holds_the_process_usage(
    fake_cuda_dir: Path, driver_program: Path, tmp_path: Path
) -> None:
    path = tmp_path / "omni-gpu-model-a"
    holder = start_holder(
        fake_cuda_dir, driver_program, OMNI_GPU_SHM_NAME=str(path), OMNI_GPU_MEMORY_LIMIT="2MiB"
    )
    try:
        usage = read_usage(path)
    finally:
        kill(holder)
    assert usage == Usage(pid=holder.pid, quota=2 << 20, used=4096, peak=4096, count=1, failures=0)


def test_default_region_is_named_after_the_pid_and_cleaned_after_a_crash(
    fake_cuda_dir: Path, driver_program: Path
) -> None:
    holder = start_holder(fake_cuda_dir, driver_program)
    path = region_path(holder.pid)
    assert read_usage(path).used == 4096
    kill(holder)
    assert path.exists()  # SIGKILL leaves it behind
    assert path in cleanup_stale()
    assert not path.exists()


def test_cleanup_keeps_regions_of_live_processes(
    fake_cuda_dir: Path, driver_program: Path, tmp_path: Path
) -> None:
    path = tmp_path / "omni-gpu-live"
    holder = start_holder(fake_cuda_dir, driver_program, OMNI_GPU_SHM_NAME=str(path))
    try:
        assert cleanup_stale(tmp_path) == []
        assert path.exists()
    finally:
        kill(holder)
    assert cleanup_stale(tmp_path) == [path]


def test_region_is_removed_at_normal_exit(run_driver: Scenario, tmp_path: Path) -> None:
    path = tmp_path / "omni-gpu-exit"
    run_driver("quota", 1000, 1, OMNI_GPU_SHM_NAME=str(path))
    assert not path.exists()


def test_read_usage_rejects_other_files(tmp_path: Path) -> None:
    short = tmp_path / "omni-gpu-short"
    short.write_bytes(b"x" * 10)
    foreign = tmp_path / "omni-gpu-foreign"
    foreign.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a 64-byte usage region"):
        read_usage(short)
    with pytest.raises(ValueError, match="is not a version 1 omni usage region"):
        read_usage(foreign)
    assert cleanup_stale(tmp_path) == []
