from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import omni_cstub

HERE = Path(__file__).resolve().parent
FAKE_SOURCE = HERE / "fake_libcuda.c"
DRIVER_SOURCE = HERE / "driver.c"
FRONTENDS_SCRIPT = HERE / "frontends_script.py"

Scenario = Callable[..., dict[str, str]]


def compile_c(args: list[str]) -> None:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(
            f"the cstub tests build a fake libcuda with a C compiler; {compiler} is missing"
        )
    subprocess.run([compiler, *args], check=True)


@pytest.fixture(scope="session")
def fake_cuda_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fake-cuda")
    compile_c(["-O2", "-fPIC", "-shared", "-o", str(directory / "libcuda.so.1"), str(FAKE_SOURCE)])
    return directory


@pytest.fixture(scope="session")
def driver_program(fake_cuda_dir: Path) -> Path:
    program = fake_cuda_dir / "driver"
    compile_c(
        [
            *("-O1", "-pthread", "-o", str(program), str(DRIVER_SOURCE)),
            *(f"-L{fake_cuda_dir}", "-l:libcuda.so.1", "-ldl"),
        ]
    )
    return program


def scenario_env(fake_cuda_dir: Path, preload: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNI_", "FAKE_CUDA_"))}
    env["LD_LIBRARY_PATH"] = str(fake_cuda_dir)
    if preload:
        env["LD_PRELOAD"] = str(omni_cstub.library_path())
    env.update(extra)
    return env


def parse(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


@pytest.fixture
def run_driver(fake_cuda_dir: Path, driver_program: Path) -> Scenario:
    """Runs one driver.c scenario with the hooks preloaded; env keywords become variables."""

    def run(*args: object, prefix: list[str] | None = None, **env: str) -> dict[str, str]:
        command = [*(prefix or []), str(driver_program), *map(str, args)]
        done = subprocess.run(
            command,
            env=scenario_env(fake_cuda_dir, preload=True, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{command} failed: {done.stderr}"
        values = parse(done.stdout)
        values["stderr"] = done.stderr
        return values

    return run


@pytest.fixture
def run_python(fake_cuda_dir: Path) -> Scenario:
    """Runs one frontends_script.py scenario in a fresh interpreter against the fake driver."""

    def run(name: str, **env: str) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, str(FRONTENDS_SCRIPT), name],
            env=scenario_env(fake_cuda_dir, preload=False, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{name} failed: {done.stderr}"
        return parse(done.stdout)

    return run
