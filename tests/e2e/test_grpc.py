"""An unmodified tritonclient.grpc against a real runtime started with --grpc-port."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

ECHO = "@test/echo"
UNKNOWN = "Request for unknown model: 'missing/model' is not found"  # Triton's words


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with serve(FIXTURES / "packages" / "echo-models", extra=["--grpc-port", "0"]) as runtime:
        line = runtime.wait_for_line(r"KServe v2 gRPC at \S+")
        match = re.search(r"gRPC at (\S+)", line)
        assert match is not None
        yield match.group(1)


@pytest.fixture()
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(address) as grpc_client:
        yield grpc_client


def _echo_inputs() -> list[triton.InferInput]:
    arrays = {
        "text": (np.array([b"hi"], dtype=np.object_), "BYTES"),
        "count": (np.array([3], dtype=np.int64), "INT64"),
        "values": (np.array([1.5, 2.0, 0.5], dtype=np.float32), "FP32"),
        "matrix": (np.arange(6, dtype=np.float32).reshape(2, 3), "FP32"),
        "words": (np.array(["α", "b"], dtype=np.object_), "BYTES"),
        "flag": (np.array([True]), "BOOL"),
    }
    inputs = []
    for name, (array, datatype) in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_health_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "omni"
    assert client.is_model_ready(ECHO)
    metadata = client.get_model_metadata(ECHO)
    assert metadata.name == ECHO and "text" in {t.name for t in metadata.inputs}
    config = client.get_model_config(ECHO).config
    assert config.name == ECHO and "values" in {t.name for t in config.input}


def test_infer_every_datatype_through_raw_contents(client: triton.InferenceServerClient) -> None:
    outputs = [
        triton.InferRequestedOutput(name)
        for name in ("text", "count", "total", "values", "matrix", "words", "flag")
    ]
    result = client.infer(ECHO, _echo_inputs(), outputs=outputs, request_id="g-1")
    assert result.as_numpy("text")[0] == b"hihihi"
    assert result.as_numpy("count").tolist() == [3]
    assert result.as_numpy("total").tolist() == [4.0]
    np.testing.assert_allclose(result.as_numpy("matrix"), np.arange(6).reshape(2, 3))
    assert [w.decode() for w in result.as_numpy("words")] == ["α", "b"]
    assert result.as_numpy("flag").tolist() == [True]
    assert result.get_response().id == "g-1"


def test_infer_with_typed_contents(address: str) -> None:
    """What other gRPC clients send: typed contents fields rather than raw bytes."""
    request = service_pb2.ModelInferRequest(model_name=ECHO)
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"ab")
    count = request.inputs.add(name="count", datatype="INT64", shape=[1])
    count.contents.int64_contents.append(2)
    values = request.inputs.add(name="values", datatype="FP32", shape=[2])
    values.contents.fp32_contents.extend([1.0, 2.5])
    with grpc.insecure_channel(address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    raw = response.raw_output_contents
    assert np.frombuffer(raw[outputs["total"]], dtype=np.float32).tolist() == [3.5]
    assert raw[outputs["text"]][4:] == b"abab"  # 4-byte length prefix, then the bytes


def test_errors_are_grpc_status_codes_naming_the_model(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException, match=UNKNOWN) as info:
        client.get_model_metadata("missing/model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    wrong = triton.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input 'text' has datatype FP32") as info:
        client.infer(ECHO, [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_repository_and_statistics(client: triton.InferenceServerClient) -> None:
    names = {m.name for m in client.get_model_repository_index().models}
    assert ECHO in names
    client.infer(ECHO, _echo_inputs()[:1])
    stats = client.get_inference_statistics(ECHO).model_stats[0]
    assert stats.name == ECHO and stats.inference_stats.success.count >= 1
    client.unload_model("@test/batch")
    client.load_model("@test/batch")
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
    assert client.infer("@test/batch", [text]).as_numpy("text")[0] == b"ABC"


def test_tokens_travel_as_authorization_metadata() -> None:
    tokens = {"OMNI_API_TOKEN": "api-secret", "OMNI_ADMIN_TOKEN": "admin-secret"}
    packages = FIXTURES / "packages" / "echo-models"
    with serve(packages, extra=["--grpc-port", "0"], env=tokens) as runtime:
        line = runtime.wait_for_line(r"KServe v2 gRPC at \S+")
        address = line.rsplit(" ", 1)[1]
        with triton.InferenceServerClient(address) as client:
            assert client.is_server_live()  # health stays open
            with pytest.raises(InferenceServerException, match="OMNI_API_TOKEN") as info:
                client.get_model_metadata(ECHO)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            api = {"authorization": "Bearer api-secret"}
            assert client.get_model_metadata(ECHO, headers=api).name == ECHO
            with pytest.raises(InferenceServerException, match="OMNI_ADMIN_TOKEN"):
                client.unload_model("@test/batch", headers=api)
            client.unload_model("@test/batch", headers={"authorization": "Bearer admin-secret"})


def test_stream_infer_answers_each_request_and_reports_errors_in_the_stream(
    client: triton.InferenceServerClient,
) -> None:
    import queue

    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for index in range(3):
            text = triton.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array([f"s{index}".encode()], dtype=np.object_))
            client.async_stream_infer(ECHO, [text], request_id=f"r{index}")
        client.async_stream_infer("missing/model", [text], request_id="bad")
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"last"], dtype=np.object_))
        client.async_stream_infer(
            ECHO, [text], request_id="final", enable_empty_final_response=True
        )
        answers = [results.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    good = {r.get_response().id: r for r, e in answers if e is None}
    errors = [str(e) for r, e in answers if e is not None]
    assert set(good) == {"r0", "r1", "r2", "final"}
    for index in range(3):
        assert good[f"r{index}"].as_numpy("text")[0] == f"s{index}".encode()
    final = good["final"].get_response()
    assert final.parameters["triton_final_response"].bool_param is True
    assert len(errors) == 1 and UNKNOWN in errors[0]
