"""Memory tiers on a (fake) GPU: a replica is parked to make room and woken by its next request.

Two CUDA models share a GPU with room for one. The workers run libomnicuda over the fake
driver the cstub tests build (its prefetches take time: FAKE_CUDA_PREFETCH_GBPS), so the
runtime's PREFETCH frames really move the replica's allocations, and a wake costs what moving
its memory back costs, not a fresh start.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.cstub.conftest import FAKE_SOURCE, compile_c
from tests.e2e.runtime import metric, serve

MODEL = """
import ctypes

from pydantic import BaseModel

from omni_sdk import Engine, Resources, hookimpl


class Ask(BaseModel):
    text: str = ""


class Moves(BaseModel):
    to_host: int
    to_gpu: int
    gpu_bytes: int


def counter(name):
    driver = ctypes.CDLL("libcuda.so.1")  # the fake one libomnicuda loaded
    driver.fake_cuda_counter.restype = ctypes.c_longlong
    return int(driver.fake_cuda_counter(name.encode()))


class Holder(Engine):
    resources = Resources(memory="512MiB", gpu_memory="64MiB")

    def load(self, ctx):
        import omni_cstub

        hooks = omni_cstub.Hooks()
        self.kept = [hooks.lib.omni_ort_alloc(16 << 20) for _ in range(3)]  # 48 MiB

    def infer(self, request: Ask) -> Moves:
        return Moves(
            to_host=counter("prefetch_to_host"),
            to_gpu=counter("prefetch_to_gpu"),
            gpu_bytes=counter("live_bytes"),
        )


class A(Holder):
    name = "@test/gpu-a"


class B(Holder):
    name = "@test/gpu-b"


@hookimpl
def register_engines(register):
    register(A)
    register(B)
"""


def gauge(metrics: str, name: str, model: str) -> float:
    return metric(metrics, name, model=model)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("park-wake")
    package = root / "gpu-models"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[project]\nname = "omni-test-gpu-models"\nversion = "0.1.0"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\n'
        'gpu = "omni_test_gpu_models"\n'
    )
    (package / "omni_test_gpu_models.py").write_text(MODEL)
    compile_c(["-O2", "-fPIC", "-shared", "-o", str(package / "libcuda.so.1"), str(FAKE_SOURCE)])
    for path in (root, package, *package.iterdir()):  # the models run as users of their own
        path.chmod(0o755 if path.is_dir() or path.suffix == ".1" else 0o644)
    config = ['[scheduler]\ngpus = {"cuda:0" = "100MiB"}\ngpu_overcommit = 1.0\n']
    for name in ("@test/gpu-a", "@test/gpu-b"):
        config.append(
            f'[models."{name}"]\ndevice = "cuda"\n'
            f'[models."{name}".env]\nLD_LIBRARY_PATH = "{package}"\n'
            # 48 MiB at 0.4 GB/s: each move takes about 0.13 s.
            'FAKE_CUDA_PREFETCH_GBPS = "0.4"\n'
        )
    (root / "omni.toml").write_text("\n".join(config))
    return root


def test_a_replica_is_parked_for_room_and_woken_by_its_next_request(repository: Path) -> None:
    with (
        serve(repository, extra=["--log-level", "info"]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        first = http.post("/ai/run/@test/gpu-a", json={})
        assert first.status_code == 200, first.text
        assert first.json()["result"]["to_host"] == 0
        # b needs the GPU's room: a is idle, the host has room for its memory, and moving it
        # back costs less than starting it again, so a is parked rather than stopped.
        b = http.post("/ai/run/@test/gpu-b", json={})
        assert b.status_code == 200, b.text
        runtime.wait_for_line(r"model '@test/gpu-a': parked replica \d+", timeout=10)
        metrics = http.get("/metrics").text
        assert gauge(metrics, "omni_model_parked_replicas", "@test/gpu-a") == 1
        assert gauge(metrics, "omni_model_replicas", "@test/gpu-a") == 0
        # a's next request wakes it: the same process, its memory moved back to the device, no
        # second cold start. (b stays: measured, each holds 48 MiB, and both fit in 100 MiB.)
        again = http.post("/ai/run/@test/gpu-a", json={})
        assert again.status_code == 200, again.text
        moves = again.json()["result"]
        assert moves["to_host"] >= 1 and moves["to_gpu"] >= 1
        assert moves["gpu_bytes"] == 48 << 20
        woke = runtime.wait_for_line(r"model '@test/gpu-a': woke replica \d+ in", timeout=10)
        seconds = float(re.search(r"in ([\d.]+)s", woke).group(1))  # type: ignore[union-attr]
        assert seconds >= 0.1  # the wake waited for the memory to move back
        metrics = http.get("/metrics").text
        assert gauge(metrics, "omni_model_wakes_total", "@test/gpu-a") == 1
        assert gauge(metrics, "omni_model_cold_starts_total", "@test/gpu-a") == 1
        assert gauge(metrics, "omni_model_replicas", "@test/gpu-b") == 1
        assert (
            metric(metrics, "omni_model_evictions_total", model="@test/gpu-a", reason="memory") == 1
        )
        # The usage region the runtime reads shows what the worker holds through the hooks.
        assert (
            metric(metrics, "omni_model_memory_bytes", kind="gpu", model="@test/gpu-a") == 48 << 20
        )
