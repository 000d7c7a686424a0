"""Every variant of the model template renders a package that tests, discovers and serves.

Rendered through `omni-runtime new`, as a user without cookiecutter on their PATH would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.runtime import serve

ENGINES = ["python", "torch", "onnx", "zero-code"]


def _new(tmp_path: Path, engine: str, name: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "new", "--engine", engine, "--name", name,
         "--output-dir", str(tmp_path), "--no-input"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    package = tmp_path / name.rsplit("/", 1)[1]
    assert f"created {package}" in result.stdout
    return package


def _own_tests(package: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=package,
        env=dict(os.environ, PYTHONPATH=str(package)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_each_variant_tests_itself_and_serves(tmp_path: Path, engine: str) -> None:
    name = f"@cf/acme/tiny-{engine}"
    package = _new(tmp_path, engine, name)
    if engine == "zero-code":
        assert sorted(p.name for p in package.iterdir()) == ["README.md", "model.onnx", "omni.toml"]
    else:
        module = package / f"tiny_{engine}"
        model_files = {"torch": ["weights.safetensors"], "onnx": ["model.onnx"]}.get(engine, [])
        assert sorted(p.name for p in module.iterdir()) == sorted(
            ["__init__.py", "py.typed", *model_files]
        )
        _own_tests(package)
    listed = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "models", str(package), "--json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    [model] = json.loads(listed)["models"]
    assert model["name"] == name
    with serve(package, extra=["--state-dir", str(tmp_path / "state")]) as runtime:
        client = triton.InferenceServerClient(runtime.url.removeprefix("http://"))
        if engine == "python":
            response = httpx.post(f"{runtime.url}/ai/run/{name}", json={"text": "a great day"})
            assert response.status_code == 200, response.text
            assert response.json()["result"]["label"] == "positive"
            text = triton.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"meh"], dtype=np.object_))
            assert client.infer(name, [text]).as_numpy("label")[0] == b"negative"
            return
        x = [[1.0, 2.0, 3.0, 4.0]]
        response = httpx.post(f"{runtime.url}/ai/run/{name}", json={"x": x}, timeout=60)
        assert response.status_code == 200, response.text
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array(x, dtype=np.float32))
        y = client.infer(name, [tensor]).as_numpy("y")
        np.testing.assert_allclose(y, np.array(response.json()["result"]["y"]), rtol=1e-6)
        # the torch variant's weights: y = mean(x) + 1; the graph of the others: y = 2x + 1
        np.testing.assert_allclose(y, [[3.5]] if engine == "torch" else [[3.0, 5.0, 7.0, 9.0]])


def test_a_bad_model_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "new", "--name", "Not A Name",
         "--output-dir", str(tmp_path), "--no-input"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is not a model name like '@cf/acme/my-model'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
