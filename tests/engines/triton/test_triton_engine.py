"""TritonEngine against a second omni-runtime process."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from omni_engine_triton import TritonEngine
from omni_sdk import ModelLoadError
from omni_sdk.discover import describe
from omni_sdk.testing import EngineCallError, EngineTester
from tests.e2e.runtime import RunningRuntime, serve

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def remote() -> Iterator[RunningRuntime]:
    with serve(HERE / "remote") as running:
        yield running


@pytest.fixture(scope="module")
def forwarding(
    remote: RunningRuntime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningRuntime]:
    # A forwarding model needs the node's network, and its URL reaches it as the operator
    # gives it: through omni.toml (the runtime's own environment is not passed on).
    config = tmp_path_factory.mktemp("forwarder") / "omni.toml"
    config.write_text(
        '[models."@local/scale"]\nnetwork = "host"\n'
        f'[models."@local/scale".env]\nOMNI_TEST_REMOTE_URL = "{remote.url}"\n'
    )
    with serve(HERE / "forwarder", extra=["--config", str(config)]) as running:
        yield running


def _forwarder(url: str) -> type[TritonEngine]:
    attrs = {"name": "@local/scale", "url": url, "remote_model": "@remote/scale"}
    return type("Forwarded", (TritonEngine,), attrs)


def test_metadata_comes_from_the_remote_model(forwarding: RunningRuntime) -> None:
    client = triton.InferenceServerClient(forwarding.host_port)
    metadata = client.get_model_metadata("@local/scale")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}]


def test_tritonclient_through_two_runtimes(forwarding: RunningRuntime) -> None:
    client = triton.InferenceServerClient(forwarding.host_port)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    item = triton.InferInput("x", [2, 3], "FP32")
    item.set_data_from_numpy(x, binary_data=True)
    result = client.infer("@local/scale", [item])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
    response = httpx.post(f"{forwarding.url}/ai/run/@local/scale", json={"x": [[1, 2]]})
    assert response.json()["result"] == {"y": [[3.0, 6.0]]}


def test_bad_input_is_refused_with_the_tensor_named(forwarding: RunningRuntime) -> None:
    response = httpx.post(
        f"{forwarding.url}/v2/models/@local/scale/infer",
        json={"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [1]}]},
    )
    assert response.status_code == 400
    assert "input 'x' has datatype INT64, expected FP32" in response.json()["error"]


def test_in_process_forwarding(remote: RunningRuntime) -> None:
    with EngineTester(_forwarder(remote.url)) as tester:
        out = tester.infer_arrays({"x": np.ones((1, 2), dtype=np.float32)})
        assert out["y"].tolist() == [[3.0, 3.0]]


def test_a_server_that_is_down_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before it is used: nothing listens
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ModelLoadError) as caught:
        describe(_forwarder(url))
    assert f"model '@local/scale': the remote server {url}" in str(caught.value)
    with pytest.raises(ModelLoadError, match=f"remote server {url}"):
        EngineTester(_forwarder(url))


def test_a_server_that_goes_down_gives_a_500_naming_it(remote: RunningRuntime) -> None:
    with EngineTester(_forwarder(remote.url)) as tester:
        tester.engine.client.close()  # type: ignore[attr-defined]
        down = f"http://127.0.0.1:{_free_port()}"
        type(tester.engine).url = down  # type: ignore[misc]
        tester.engine.client = type(tester.engine)._client(5.0)  # type: ignore[attr-defined]
        with pytest.raises(EngineCallError) as caught:
            tester.infer_arrays({"x": np.ones((1, 2), dtype=np.float32)})
    assert caught.value.status == 500
    assert f"the remote server {down}" in str(caught.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
