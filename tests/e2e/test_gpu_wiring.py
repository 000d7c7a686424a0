"""A model placed on CUDA gets libomnicuda preloaded with its quota; no GPU needed to check."""

from __future__ import annotations

from pathlib import Path

import httpx

import omni_cstub
from tests.conftest import FIXTURES
from tests.e2e.runtime import serve


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
        assert 'omni_model_memory_bytes{kind="gpu",model="@test/env"} 0.0' in metrics
