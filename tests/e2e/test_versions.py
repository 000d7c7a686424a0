"""A model's version: its package's distribution version unless omni.toml sets one, named on
every answer (Omni-Model-Version, gRPC trailing metadata) and reachable by version route."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.runtime import serve

ECHO = Path(__file__).resolve().parents[1] / "fixtures" / "packages" / "echo-models"
V2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["v"]}]}


def test_versions_are_named_on_every_answer_and_reachable(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/fail"]\nversion = "2024.06"\n')
    with serve(ECHO, extra=["--config", str(config), "--grpc-port", "0"]) as runtime:
        port = runtime.wait_for_line(r"KServe v2 gRPC at \S+:(\d+)").rsplit(":", 1)[1]
        with httpx.Client(base_url=runtime.url, timeout=30) as client:
            answer = client.post("/ai/run/@test/echo", json={"text": "v"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["omni-model-version"] == "0.1.0"  # pyproject's version
            assert client.get("/v2/models/@test/echo").json()["versions"] == ["0.1.0"]
            # omni.toml's version wins, on answers that are errors too
            failed = client.post("/ai/run/@test/fail", json={"text": "x"})
            assert failed.headers["omni-model-version"] == "2024.06"
            # version routes: the model's version, or "1" as Triton clients send
            for version in ("0.1.0", "1"):
                routed = client.post(f"/v2/models/@test/echo/versions/{version}/infer", json=V2)
                assert routed.status_code == 200, routed.text
            wrong = client.post("/v2/models/@test/echo/versions/9/infer", json=V2)
            assert wrong.status_code == 404
            assert "'9'" in wrong.text and "'0.1.0'" in wrong.text
            assert wrong.json()["error"].startswith("Request for unknown model: '@test/echo'")
            index = client.post("/v2/repository/index", json={}).json()
            versions = {entry["name"]: entry["version"] for entry in index}
            assert versions["@test/echo"] == "0.1.0" and versions["@test/fail"] == "2024.06"
        # The v2 body names the version that served, as the worker was started with it.
        text = np.array([b"v"], dtype=np.object_)
        http_input = triton_http.InferInput("text", [1], "BYTES")
        http_input.set_data_from_numpy(text)
        http_client = triton_http.InferenceServerClient(runtime.host_port)
        served = http_client.infer("@test/echo", [http_input]).get_response()
        assert served["model_version"] == "0.1.0" and served["model_name"] == "@test/echo"
        grpc_input = triton_grpc.InferInput("text", [1], "BYTES")
        grpc_input.set_data_from_numpy(text)
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert grpc_client.infer("@test/echo", [grpc_input]).get_response().model_version == (
            "0.1.0"
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response, call = stub.ModelInfer.with_call(
                service_pb2.ModelInferRequest(
                    model_name="@test/echo",
                    inputs=[{"name": "text", "datatype": "BYTES", "shape": [1]}],
                    raw_input_contents=[b"\x01\x00\x00\x00g"],
                )
            )
            assert response.model_version == "0.1.0"
            assert dict(call.trailing_metadata())["omni-model-version"] == "0.1.0"
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="@test/echo", version="9"))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_version_that_is_not_a_version_is_refused_naming_the_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/echo"]\nversion = "two words"\n')
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(ECHO), "--config", str(config),
         "--port", "0", "--shared-env"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "version" in result.stderr and str(config) in result.stderr
