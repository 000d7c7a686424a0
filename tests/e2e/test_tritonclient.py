"""An unmodified tritonclient.http against a real runtime."""

from __future__ import annotations

import gzip
import json
import os
import re

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.runtime import RunningRuntime

ECHO = "@test/echo"
UNKNOWN = "Request for unknown model: 'missing/model' is not found"  # Triton's words


@pytest.fixture()
def client(runtime: RunningRuntime) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(runtime.host_port)


def _echo_inputs(binary: bool) -> list[triton.InferInput]:
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_), binary_data=binary)
    count = triton.InferInput("count", [1], "INT64")
    count.set_data_from_numpy(np.array([3], dtype=np.int64), binary_data=binary)
    values = triton.InferInput("values", [3], "FP32")
    values.set_data_from_numpy(np.array([1.5, 2.0, 0.5], dtype=np.float32), binary_data=binary)
    matrix = triton.InferInput("matrix", [2, 3], "FP32")
    matrix.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), binary_data=binary)
    words = triton.InferInput("words", [2], "BYTES")
    words.set_data_from_numpy(np.array(["α", "b"], dtype=np.object_), binary_data=binary)
    flag = triton.InferInput("flag", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]), binary_data=binary)
    return [text, count, values, matrix, words, flag]


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "omni"
    assert "binary_tensor_data" in metadata["extensions"]
    # Every model serves on demand, including the broken one until a request finds it broken.
    assert client.is_server_ready()


def test_model_metadata_config_and_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(ECHO)
    metadata = client.get_model_metadata(ECHO)
    assert metadata["name"] == ECHO
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs["text"] == ("BYTES", [1])
    assert inputs["values"] == ("FP32", [-1])
    assert inputs["matrix"] == ("FP32", [-1, -1])
    assert inputs["words"] == ("BYTES", [-1])
    assert inputs["count"] == ("INT64", [1])
    assert inputs["flag"] == ("BOOL", [1])
    config = client.get_model_config(ECHO)
    assert config["name"] == ECHO
    assert {t["name"] for t in config["input"]} == set(inputs)
    assert client.get_model_metadata(ECHO, model_version="1")["name"] == ECHO


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_every_datatype(client: triton.InferenceServerClient, binary: bool) -> None:
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("text", "count", "total", "values", "matrix", "words", "flag")
    ]
    result = client.infer(ECHO, _echo_inputs(binary), outputs=outputs, request_id="r-1")
    assert result.as_numpy("text")[0] in (b"hihihi", "hihihi")
    assert result.as_numpy("count").tolist() == [3]
    assert result.as_numpy("total").tolist() == [4.0]
    np.testing.assert_allclose(result.as_numpy("values"), [1.5, 2.0, 0.5])
    np.testing.assert_allclose(result.as_numpy("matrix"), np.arange(6).reshape(2, 3))
    words = [w.decode() if isinstance(w, bytes) else w for w in result.as_numpy("words")]
    assert words == ["α", "b"]
    assert result.as_numpy("flag").tolist() == [True]
    assert result.get_response()["id"] == "r-1"


def test_default_outputs_are_binary(client: triton.InferenceServerClient) -> None:
    # Without requested outputs tritonclient asks for binary_data_output.
    result = client.infer(ECHO, _echo_inputs(True)[:1])
    assert result.as_numpy("text")[0] == b"hi"
    assert result.get_output("pid")["parameters"]["binary_data_size"] == 8


def test_infer_batching_engine(client: triton.InferenceServerClient) -> None:
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
    result = client.infer("@test/batch", [text])
    assert result.as_numpy("text")[0] == b"ABC"


def test_errors_name_the_model_and_tensor(client: triton.InferenceServerClient) -> None:
    wrong_type = triton.InferInput("text", [1], "FP32")
    wrong_type.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(
        InferenceServerException, match="input 'text' has datatype FP32, expected BYTES"
    ):
        client.infer(ECHO, [wrong_type])
    unknown = triton.InferInput("nope", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="has no input 'nope'"):
        client.infer(ECHO, [unknown])
    with pytest.raises(InferenceServerException, match=UNKNOWN):
        client.get_model_metadata("missing/model")
    with pytest.raises(InferenceServerException, match=r"model '@test/fail' failed: ValueError"):
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        client.infer("@test/fail", [text])


def test_statistics(client: triton.InferenceServerClient) -> None:
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    before = client.get_inference_statistics(ECHO)["model_stats"][0]["inference_stats"]["success"][
        "count"
    ]
    client.infer(ECHO, [text])
    stats = client.get_inference_statistics(ECHO)["model_stats"][0]
    assert stats["name"] == ECHO
    assert stats["inference_stats"]["success"]["count"] == before + 1
    everything = client.get_inference_statistics()["model_stats"]
    assert ECHO in {s["name"] for s in everything}


def test_repository_index_unload_and_load(client: triton.InferenceServerClient) -> None:
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["@test/echo"]["state"] == "READY"
    # The broken model starts on its first request, which finds it broken.
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"weights\.safetensors is missing"):
        client.infer("@test/broken", [text])
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["@test/broken"]["state"] == "UNAVAILABLE"
    assert "weights.safetensors is missing" in index["@test/broken"]["reason"]
    assert client.is_server_ready()  # one model's failure is its own, not the node's

    client.unload_model("@test/batch")
    assert not client.is_model_ready("@test/batch")
    with pytest.raises(InferenceServerException, match="unavailable: unloaded"):
        client.infer("@test/batch", [text])
    client.load_model("@test/batch")
    assert client.is_model_ready("@test/batch")
    assert client.infer("@test/batch", [text]).as_numpy("text")[0] == b"X"

    with pytest.raises(InferenceServerException, match="failed to load model '@test/broken'"):
        client.load_model("@test/broken")


def test_large_tensors_travel_through_shared_memory(
    client: triton.InferenceServerClient, runtime: RunningRuntime
) -> None:
    # 400 KB each way: over the 256 KiB threshold, so both directions use a memfd.
    values = np.random.default_rng(0).random(100_000, dtype=np.float32)
    mark = len(runtime.lines)
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"big"], dtype=np.object_))
    tensor = triton.InferInput("values", [values.size], "FP32")
    tensor.set_data_from_numpy(values)
    outputs = [triton.InferRequestedOutput("values"), triton.InferRequestedOutput("total")]
    result = client.infer(ECHO, [text, tensor], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("values"), values)
    assert result.as_numpy("total")[0] == pytest.approx(values.sum(dtype=np.float64), rel=1e-4)
    # The runtime's debug log says how each payload travelled: in a memfd, both ways.
    sent = runtime.wait_for_line(r"@test/echo.*: request (\d+) went in a memfd", 10, mark)
    request_id = re.search(r"request (\d+) went", sent).group(1)  # type: ignore[union-attr]
    runtime.wait_for_line(rf"@test/echo.*: answer {request_id} came in a memfd", 10, mark)
    # ... and no named file: nothing another process could open.
    prefix = f"omni-{runtime.process.pid}-"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(
    client: triton.InferenceServerClient, runtime: RunningRuntime, algorithm: str
) -> None:
    text = triton.InferInput("text", [1], "BYTES")
    long = "compress me " * 200  # an answer large enough to be compressed
    text.set_data_from_numpy(np.array([long.encode()], dtype=np.object_), binary_data=True)
    result = client.infer(
        ECHO,
        [text],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert result.as_numpy("text")[0] == long.encode()
    # the answer really came compressed, and smaller
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [long]}]}
    raw = httpx.post(
        f"{runtime.url}/v2/models/{ECHO}/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"content-encoding": "gzip", "accept-encoding": algorithm},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-encoding"] == algorithm
    assert int(raw.headers["content-length"]) < len(long)


def test_a_bad_compressed_body_is_refused_and_a_bomb_stops_at_the_limit(
    runtime: RunningRuntime,
) -> None:
    url = f"{runtime.url}/ai/run/{ECHO}"
    broken = httpx.post(url, content=b"\x1f\x8bnot gzip", headers={"content-encoding": "gzip"})
    assert broken.status_code == 400 and "gzip" in broken.text
    cut = gzip.compress(b'{"text": "whole"}')[:-6]
    short = httpx.post(url, content=cut, headers={"content-encoding": "gzip"})
    assert short.status_code == 400, short.text
    brotli = httpx.post(url, content=b"{}", headers={"content-encoding": "br"})
    assert brotli.status_code == 415 and "'br'" in brotli.text
    # 64 MiB of zeros in a few KiB: refused once it passes the server's 1 MiB, not inflated
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    assert len(bomb) < 1 << 20
    refused = httpx.post(url, content=bomb, headers={"content-encoding": "gzip"}, timeout=30)
    assert refused.status_code == 413, refused.text
    ok = httpx.post(url, json={"text": "still here"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_model_control_applies_what_it_can_and_refuses_the_rest(
    client: triton.InferenceServerClient,
) -> None:
    before = client.get_model_config(ECHO)["instance_group"][0]["count"]
    config = json.dumps({"name": ECHO, "instance_group": [{"count": 3, "kind": "KIND_CPU"}]})
    client.load_model(ECHO, config=config)
    assert client.get_model_config(ECHO)["instance_group"][0]["count"] == 3
    client.load_model(ECHO, config=json.dumps({"instance_group": [{"count": before}]}))
    with pytest.raises(InferenceServerException, match="dynamic_batching"):
        client.load_model(ECHO, config=json.dumps({"dynamic_batching": {}}))
    with pytest.raises(InferenceServerException, match="max_batch_size"):
        client.load_model(ECHO, config=json.dumps({"max_batch_size": 64}))
    # files are served as an ONNX graph (test_model_files.py); a config that is not one's is not
    with pytest.raises(InferenceServerException, match=r"failed to load .* 'platform'"):
        client.load_model(ECHO, config="{}", files={"file:1/model.onnx": b"graph"})
    with pytest.raises(InferenceServerException, match="failed to load 'no/such'"):
        client.load_model("no/such")
    assert client.is_model_ready(ECHO)
