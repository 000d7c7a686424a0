"""Model control with files, as Triton's explicit mode takes them: ``load_model(name,
config=..., files={"file:1/model.onnx": ...})`` through unmodified tritonclient, over HTTP and
gRPC. A new name is served from the files; a served model is rolled out to new files; a
request that cannot be served is refused naming the file or field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.e2e.runtime import serve

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "packages"
CONFIG = json.dumps({"platform": "onnxruntime_onnx", "max_batch_size": 8})


def graph(factor: float) -> bytes:
    """y = x * factor, for x of shape [-1, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    scale = helper.make_tensor("factor", TensorProto.FLOAT, [1], [factor])
    node = helper.make_node("Mul", ["x", "factor"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "scaled", [x], [y], initializer=[scale]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


def http_infer(client: httpclient.InferenceServerClient, name: str) -> np.ndarray:
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    return np.asarray(client.infer(name, [x]).as_numpy("y"))


def test_a_model_loaded_from_files_is_served_and_new_files_replace_it(tmp_path: Path) -> None:
    extra = ["--grpc-port", "0", "--state-dir", str(tmp_path / "state")]
    with serve(FIXTURES / "echo-models", extra=extra) as runtime:
        grpc_port = runtime.wait_for_line(r"KServe v2 gRPC at").rsplit(":", 1)[1].strip()
        http = httpclient.InferenceServerClient(runtime.host_port)
        http.load_model("@test/scaled", config=CONFIG, files={"file:1/model.onnx": graph(2.0)})
        assert http.is_model_ready("@test/scaled")
        np.testing.assert_allclose(http_infer(http, "@test/scaled"), [[2.0, 4.0, 6.0]])
        config = http.get_model_config("@test/scaled")
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [3]
        first = http.get_model_metadata("@test/scaled")["versions"]

        # new files over gRPC: the model is rolled out to them
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        grpc.load_model("@test/scaled", config=CONFIG, files={"file:1/model.onnx": graph(10.0)})
        np.testing.assert_allclose(http_infer(http, "@test/scaled"), [[10.0, 20.0, 30.0]])
        assert http.get_model_metadata("@test/scaled")["versions"] != first
        # the same files again just load it
        grpc.load_model("@test/scaled", config=CONFIG, files={"file:1/model.onnx": graph(10.0)})
        np.testing.assert_allclose(http_infer(http, "@test/scaled"), [[10.0, 20.0, 30.0]])
        # the node's other models are untouched
        assert http.is_model_ready("@test/echo")


@pytest.mark.parametrize(
    ("config", "files", "words"),
    [
        (CONFIG, {"file:../escape.onnx": b"x"}, "a file's path must be relative"),
        (CONFIG, {"file:/etc/model.onnx": b"x"}, "a file's path must be relative"),
        (None, {"file:1/model.onnx": b"x"}, "'config' (the model's configuration, as JSON)"),
        ('{"platform": "tensorflow_savedmodel"}', {"file:1/model.onnx": b"x"}, "'platform'"),
        (CONFIG, {"file:1/notes.txt": b"x"}, "no '<version>/model.onnx' among the files"),
        (CONFIG, {"file:1/model.onnx": b"not a graph"}, "failed to load model '@test/bad'"),
    ],
)
def test_files_that_cannot_be_served_are_refused_naming_why(
    tmp_path: Path, config: str | None, files: dict[str, bytes], words: str
) -> None:
    extra = ["--state-dir", str(tmp_path / "state")]
    with serve(FIXTURES / "echo-models", extra=extra) as runtime:
        http = httpclient.InferenceServerClient(runtime.host_port)
        with pytest.raises(InferenceServerException) as refused:
            http.load_model("@test/bad", config=config, files=files)
        assert "failed to load" in str(refused.value) and words in str(refused.value)
        assert not (tmp_path / "escape.onnx").exists()
        assert http.is_model_ready("@test/echo")  # nothing else changed
