"""A zero-code package: a graph and an omni.toml, no Python, served by the onnx engine kind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper

from tests.e2e.runtime import RunningRuntime, serve

NAME = "@test/zero-code-affine"


def _graph(path: Path) -> None:
    """y = x * 2 + 1, for x of shape [-1, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "affine", [x], [y], initializer=[two, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _package(root: Path, kind: str = "onnx") -> Path:
    package = root / "affine"
    package.mkdir()
    _graph(package / "affine.onnx")
    (package / "omni.toml").write_text(
        textwrap.dedent(f"""
        [model]
        name = "{NAME}"
        task = "tabular-regression"
        kind = "{kind}"
        file = "affine.onnx"
        max_batch_size = 8
        """)
    )
    return package


def _models(package: Path, state: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "omni_runtime.cli", "models", str(package), "--json"]
    return subprocess.run(
        [*command, "--state-dir", str(state)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRuntime]:
    root = tmp_path_factory.mktemp("zero-code")
    _package(root)
    with serve(root, extra=["--state-dir", str(root / "state")]) as running:
        yield running


def test_models_lists_it_with_the_graphs_tensors(tmp_path: Path) -> None:
    package = _package(tmp_path)
    result = _models(package, tmp_path / "state")
    assert result.returncode == 0, result.stderr
    [model] = json.loads(result.stdout)["models"]
    assert model["name"] == NAME and model["max_batch_size"] == 8
    assert model["inputs"][0]["name"] == "x" and model["inputs"][0]["datatype"] == "FP32"


def test_served_through_v2_and_tritonclient(runtime: RunningRuntime) -> None:
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]], dtype=np.float32)
    client = triton.InferenceServerClient(runtime.url.removeprefix("http://"))
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(NAME, [tensor])
    np.testing.assert_allclose(result.as_numpy("y"), x * 2 + 1)
    body = {"x": x.tolist()}
    response = httpx.post(f"{runtime.url}/ai/run/{NAME}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["result"]["y"], x * 2 + 1)


def test_config_leaves_the_batch_dimension_out_as_triton_does(runtime: RunningRuntime) -> None:
    client = triton.InferenceServerClient(runtime.url.removeprefix("http://"))
    config = client.get_model_config(NAME)
    assert config["max_batch_size"] == 8
    assert [t["dims"] for t in config["input"] + config["output"]] == [[3], [3]]
    assert client.get_model_metadata(NAME)["inputs"][0]["shape"] == [-1, 3]  # the full shape
    client.close()


def test_an_unknown_kind_names_the_file_and_the_kinds_there_are(tmp_path: Path) -> None:
    package = _package(tmp_path, kind="onnxx")
    result = _models(package, tmp_path / "state")
    output = result.stdout + result.stderr
    assert "kind 'onnxx' is not registered" in output, output
    assert "onnx, torch, triton" in output and str(package / "omni.toml") in output
