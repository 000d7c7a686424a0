"""A model placed on CUDA gets libomnicuda preloaded with its quota, and the runtime reads what
it holds on the GPU; no GPU needed to check (the cstub tests' fake libcuda stands in)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

import omni_cstub
from tests.conftest import FIXTURES
from tests.cstub.conftest import FAKE_SOURCE, compile_c
from tests.e2e.runtime import metric, serve

HOLDER = """
import ctypes

from pydantic import BaseModel

from omni_sdk import Engine, Resources, hookimpl


class Ask(BaseModel):
    text: str = ""


class Held(BaseModel):
    driver_bytes: int


class Holder(Engine):
    name = "@test/gpu-holder"
    resources = Resources(memory="512MiB", gpu_memory="64MiB")

    def load(self, ctx):
        import omni_cstub

        hooks = omni_cstub.Hooks()
        self.kept = [hooks.lib.omni_ort_alloc(8 << 20) for _ in range(3)]  # 24 MiB

    def infer(self, request: Ask) -> Held:
        driver = ctypes.CDLL("libcuda.so.1")  # the fake one libomnicuda loaded
        driver.fake_cuda_counter.restype = ctypes.c_longlong
        return Held(driver_bytes=driver.fake_cuda_counter(b"live_bytes"))


@hookimpl
def register_engines(register):
    register(Holder)
"""


def test_cuda_models_get_the_hooks_and_cpu_models_do_not(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text(
        '[models."@test/env"]\ndevice = "cuda"\n'
        '[models."@test/env".resources]\ngpu_memory = "1GiB"\n'
    )
    with (
        serve(FIXTURES / "packages" / "echo-models", extra=["--config", str(config)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        response = http.post("/ai/run/@test/env", json={})
        assert response.status_code == 200, response.text
        variables = response.json()["result"]["variables"]
        assert variables["LD_PRELOAD"] == str(omni_cstub.library_path())
        assert variables["OMNI_GPU_MEMORY_LIMIT"] == str(1 << 30)
        assert variables["OMNI_CUDA_MODE"] == "managed"
        # Its /dev/shm is private: the usage region lives in a directory bound into it.
        assert variables["OMNI_GPU_SHM_NAME"].startswith("/dev/shm/omni-gpu-")
        # The runtime itself and models on the CPU never see the preload.
        echo = http.post("/ai/run/@test/echo", json={"text": "x"})
        assert echo.status_code == 200
        metrics = http.get("/metrics").text
        assert 'omni_model_memory_bytes{kind="gpu",model="@test/env",version=' in metrics
        assert metric(metrics, "omni_model_memory_bytes", kind="gpu", model="@test/env") == 0


def _gpu_bytes(metrics: str, model: str) -> float:
    assert f'omni_model_memory_bytes{{kind="gpu",model="{model}",' in metrics, model
    return metric(metrics, "omni_model_memory_bytes", kind="gpu", model=model)


def test_the_gpu_memory_metric_is_what_the_model_holds_through_the_driver(tmp_path: Path) -> None:
    package = tmp_path / "gpu-holder"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[project]\nname = "omni-test-gpu-holder"\nversion = "0.1.0"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\n'
        'gpu = "omni_test_gpu_holder"\n'
    )
    (package / "omni_test_gpu_holder.py").write_text(HOLDER)
    compile_c(["-O2", "-fPIC", "-shared", "-o", str(package / "libcuda.so.1"), str(FAKE_SOURCE)])
    for path in (tmp_path, package, *package.iterdir()):  # the model runs as a user of its own
        path.chmod(0o755 if path.is_dir() or path.suffix == ".1" else 0o644)
    (tmp_path / "omni.toml").write_text(
        '[models."@test/gpu-holder"]\ndevice = "cuda"\n'
        f'[models."@test/gpu-holder".env]\nLD_LIBRARY_PATH = "{package}"\n'
    )
    with (
        serve(tmp_path) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        response = http.post("/ai/run/@test/gpu-holder", json={})
        assert response.status_code == 200, response.text
        held = response.json()["result"]["driver_bytes"]
        assert held == 24 << 20  # the fake driver's own count of live allocations
        deadline = time.monotonic() + 10
        while (seen := _gpu_bytes(http.get("/metrics").text, "@test/gpu-holder")) != held:
            assert time.monotonic() < deadline, f"the metric says {seen:g} bytes, not {held}"
            time.sleep(0.2)
