"""Tokens, body time, header and tensor limits, and bad numbers, against a real runtime."""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve, worker_deaths

API = "api-secret"
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {API}"}
CONFIG = '[server]\nbody_timeout = "1s"\nmax_header_size = "8KiB"\nmax_tensor_elements = 1000000\n'


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRuntime]:
    folder = tmp_path_factory.mktemp("hardening")
    (folder / "omni.toml").write_text(CONFIG)
    (folder / "api-token").write_text(API + "\n")
    env = {"OMNI_API_TOKEN_FILE": str(folder / "api-token"), "OMNI_ADMIN_TOKEN": ADMIN}
    packages = FIXTURES / "packages"
    with serve(
        packages / "echo-models",
        packages / "tensor-models",
        extra=["--config", str(folder / "omni.toml")],
        env=env,
    ) as running:
        yield running


@pytest.fixture()
def http(runtime: RunningRuntime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=runtime.url, timeout=30, headers=AUTH) as client:
        yield client


def _raw(runtime: RunningRuntime, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``request`` on a fresh connection, then read until the server closes it."""
    host, port = runtime.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received, time.monotonic() - started


def _split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return status, headers, body


# -- tokens ------------------------------------------------------------------------------


def test_api_routes_need_the_api_or_admin_token(runtime: RunningRuntime) -> None:
    with httpx.Client(base_url=runtime.url, timeout=30) as bare:
        response = bare.post("/ai/run/@test/echo", json={"text": "x"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        body = response.json()
        assert body["success"] is False and body["result"] is None and body["messages"] == []
        assert body["errors"][0]["code"] == 10000
        assert "needs a bearer token" in body["errors"][0]["message"]

        response = bare.post(
            "/v2/models/@test/echo/infer",
            json={"inputs": []},
            headers={"Authorization": "Bearer wrong"},
        )
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "not valid" in response.json()["error"]

        for path in ("/v2", "/v2/models/@test/echo", "/v2/models/@test/echo/ready",
                     "/v2/models/@test/echo/config", "/v2/models/@test/echo/stats",
                     "/v2/models/stats", "/openapi.json", "/v2/models/@nobody/here"):  # fmt: skip
            assert bare.get(path).status_code == 401, path
            assert bare.get(path, headers=AUTH).status_code in (200, 404), path
        # The admin token opens API routes too; the scheme's case does not matter.
        for value in (f"Bearer {ADMIN}", f"bearer {API}"):
            response = bare.post(
                "/ai/run/@test/echo", json={"text": "x"}, headers={"Authorization": value}
            )
            assert response.status_code == 200, value


def test_repository_routes_need_the_admin_token(http: httpx.Client) -> None:
    response = http.post("/v2/repository/index", json={})  # the API token is not enough
    assert response.status_code == 401
    assert "OMNI_ADMIN_TOKEN" in response.json()["error"]
    assert http.post("/v2/repository/models/@test/batch/unload").status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    index = http.post("/v2/repository/index", json={}, headers=admin).json()
    assert {"@test/echo", "@test/identity"} <= {entry["name"] for entry in index}


def test_health_and_metrics_stay_open(runtime: RunningRuntime) -> None:
    with httpx.Client(base_url=runtime.url, timeout=30) as bare:
        assert bare.get("/v2/health/live").status_code == 200
        assert bare.get("/v2/health/ready").status_code in (200, 503)
        assert "omni_requests_total" in bare.get("/metrics").text


def test_tritonclient_sends_the_token(runtime: RunningRuntime) -> None:
    client = triton.InferenceServerClient(runtime.host_port)
    assert client.is_server_live()
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    result = client.infer("@test/echo", [text], headers=dict(AUTH))  # it adds to the dict
    assert result.as_numpy("text")[0] == b"hi"


def test_no_token_on_a_public_address_warns_once(tmp_path: Path) -> None:
    with serve(
        FIXTURES / "packages" / "echo-models",
        extra=["--host", "0.0.0.0"],
        env={"OMNI_API_TOKEN": "", "OMNI_ADMIN_TOKEN": ""},
    ) as running:
        warnings = [line for line in running.lines if "without OMNI_API_TOKEN" in line]
        assert len(warnings) == 1
        assert "load or unload models" in warnings[0]


# -- body time and header size --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ai/run/@test/echo", "/v2/models/@test/echo/infer"])
def test_a_stalled_body_gets_408_and_the_connection_closes(
    runtime: RunningRuntime, http: httpx.Client, path: str
) -> None:
    body = json.dumps({"text": "never finished"}).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: omni\r\nAuthorization: Bearer {API}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body[: len(body) // 2]
    response, waited = _raw(runtime, request)
    status, headers, payload = _split(response)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert headers["connection"] == "close"
    assert 0.8 < waited < 5
    message = "the request was not received within 1s (server.body_timeout)"
    if path.startswith("/ai/"):
        assert json.loads(payload) == {
            "result": None,
            "success": False,
            "errors": [{"code": 3007, "message": message}],
            "messages": [],
        }
    else:
        assert json.loads(payload) == {"error": message}
    # The model never saw it, and serves the next request.
    assert http.post("/ai/run/@test/echo", json={"text": "x"}).status_code == 200


def test_stalled_headers_get_408_too(runtime: RunningRuntime) -> None:
    response, waited = _raw(runtime, b"POST /ai/run/@test/echo HTTP/1.1\r\nHost: omni\r\n")
    status, _, payload = _split(response)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert json.loads(payload)["errors"][0]["code"] == 3007
    assert 0.8 < waited < 5


def test_a_large_body_sent_promptly_is_not_cut(http: httpx.Client) -> None:
    values = list(range(100, 150_100))  # about 1 MB of JSON, many reads
    response = http.post("/ai/run/@test/numbers", json={"ints": values})
    assert response.status_code == 200
    assert response.json()["result"]["ints"][-1] == values[-1]


@pytest.mark.parametrize("path", ["/ai/run/@test/echo", "/v2/models/@test/echo/infer"])
def test_oversized_headers_get_431(runtime: RunningRuntime, path: str) -> None:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: omni\r\nX-Padding: {'p' * 10_000}\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()
    response, _ = _raw(runtime, request)
    status, headers, payload = _split(response)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["connection"] == "close"
    message = json.loads(payload)
    text = message["errors"][0]["message"] if path.startswith("/ai/") else message["error"]
    assert "larger than the server's limit of 8192 bytes (server.max_header_size)" in text


def test_a_pipelined_request_cannot_hide_oversized_headers(runtime: RunningRuntime) -> None:
    """Its head arrives in the same read as the end of the request before it (found by
    bench/soak.py): it is counted as parsed, and refused."""
    body = json.dumps({"text": "x"})
    small = (
        f"POST /ai/run/@test/echo HTTP/1.1\r\nHost: omni\r\nAuthorization: Bearer {API}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    large = (
        f"POST /ai/run/@test/echo HTTP/1.1\r\nHost: omni\r\nAuthorization: Bearer {API}\r\n"
        f"X-Padding: {'p' * 20_000}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    response, _ = _raw(runtime, (small + large).encode())
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 431 Request Header Fields Too Large" in response
    assert response.count(b"HTTP/1.1 200 OK") == 1


# -- tensors and numbers ---------------------------------------------------------------------


def _v2(http: httpx.Client, model: str, inputs: list[dict[str, object]], **extra: object):  # type: ignore[no-untyped-def]
    return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def test_a_shape_over_max_tensor_elements_is_400(http: httpx.Client) -> None:
    huge = 1 << 21  # over this runtime's server.max_tensor_elements, 1000000
    tensor = {"name": "fp32", "datatype": "FP32", "shape": [huge], "data": [1.0]}
    response = _v2(http, "@test/identity", [tensor])
    assert response.status_code == 400
    assert (
        f"input 'fp32' has shape [{huge}]: {huge} elements, more than the server's limit of "
        "1000000 (server.max_tensor_elements)" in response.json()["error"]
    )
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "bytes",
                    "datatype": "BYTES",
                    "shape": [huge],
                    "parameters": {"binary_data_size": 5},
                }
            ]
        }
    ).encode()
    response = http.post(
        "/v2/models/@test/identity/infer",
        content=header + struct.pack("<I", 1) + b"x",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "input 'bytes' has shape" in response.json()["error"]


@pytest.mark.parametrize("binary", [True, False])
def test_an_int64_beyond_its_range_is_400_and_the_worker_lives(
    http: httpx.Client, binary: bool
) -> None:
    deaths = worker_deaths(http.get("/metrics").text)
    tensor = {"name": "ints", "datatype": "INT64", "shape": [2], "data": [1, 2**80]}
    response = _v2(http, "@test/numbers", [tensor], parameters={"binary_data_output": binary})
    assert response.status_code == 400
    assert (
        "input 'ints': 1208925819614629174706176 is out of range for INT64"
        in (response.json()["error"])
    )
    for datatype, value in (("INT32", 2**31), ("UINT8", -1), ("UINT64", 2**64)):
        tensor = {"name": "ints", "datatype": datatype, "shape": [1], "data": [value]}
        response = _v2(http, "@test/numbers", [tensor])
        assert response.status_code == 400, datatype
        assert f"input 'ints': {value} is out of range" in response.json()["error"]
    for datatype, value in (("INT32", 2**31), ("UINT8", 256), ("INT64", 2**63)):
        tensor = {"name": datatype.lower(), "datatype": datatype, "shape": [1], "data": [value]}
        response = _v2(http, "@test/identity", [tensor])
        assert response.status_code == 400, datatype
        assert f"input '{datatype.lower()}'" in response.json()["error"]
    assert worker_deaths(http.get("/metrics").text) == deaths


def test_ai_run_checks_integer_ranges_as_v2_does(http: httpx.Client) -> None:
    deaths = worker_deaths(http.get("/metrics").text)
    for value in (2**80, 2**63, -(2**63) - 1):
        response = http.post("/ai/run/@test/numbers", json={"ints": [1, value]})
        assert response.status_code == 400, response.text
        assert f"input 'ints': {value} is out of range for INT64" in response.text
        assert response.json()["success"] is False
    response = http.post("/ai/run/@test/numbers", json={"ints": [1, 2**63 - 1, -(2**63)]})
    assert response.status_code == 200
    assert response.json()["result"]["ints"] == [1, 2**63 - 1, -(2**63)]
    assert worker_deaths(http.get("/metrics").text) == deaths


def test_an_unencodable_output_fails_that_request_alone(http: httpx.Client) -> None:
    deaths = worker_deaths(http.get("/metrics").text)
    for binary in (True, False):
        tensor = {"name": "ints", "datatype": "INT64", "shape": [1], "data": [13]}
        response = _v2(http, "@test/numbers", [tensor], parameters={"binary_data_output": binary})
        assert response.status_code == 500
        assert (
            "model '@test/numbers' returned a bad response: output 'ints'"
            in (response.json()["error"])
        )
    tensor = {"name": "ints", "datatype": "INT64", "shape": [1], "data": [7]}
    assert _v2(http, "@test/numbers", [tensor]).status_code == 200
    assert worker_deaths(http.get("/metrics").text) == deaths


def test_nan_and_infinity_travel_as_strings(runtime: RunningRuntime, http: httpx.Client) -> None:
    names = ["NaN", "Infinity", "-Infinity", 1.5]
    tensor = {"name": "floats", "datatype": "FP32", "shape": [4], "data": names}
    response = _v2(http, "@test/numbers", [tensor])
    assert response.status_code == 200
    [floats] = [o for o in json.loads(response.text)["outputs"] if o["name"] == "floats"]
    assert floats["data"] == names
    response = http.post("/ai/run/@test/numbers", json={"floats": names})
    assert response.json()["result"]["floats"] == names
    tensor = {"name": "fp16", "datatype": "FP16", "shape": [4], "data": names}
    response = _v2(http, "@test/identity", [tensor])
    assert response.json()["outputs"][0]["data"] == names
    response = http.post("/ai/run/@test/identity", json={"fp64": names})
    assert response.json()["result"]["fp64"] == names

    # tritonclient reads them back as floats.
    client = triton.InferenceServerClient(runtime.host_port)
    values = np.array([math.nan, math.inf, -math.inf, 2.0], dtype=np.float32)
    for binary_in in (True, False):
        fp32 = triton.InferInput("fp32", [4], "FP32")
        fp32.set_data_from_numpy(values, binary_data=binary_in)
        output = triton.InferRequestedOutput("fp32", binary_data=False)
        result = client.infer("@test/identity", [fp32], outputs=[output], headers=dict(AUTH))
        np.testing.assert_array_equal(result.as_numpy("fp32"), values)
    for body in ({"fp32": ["nan"]}, {"fp32": ["1.5"]}):
        assert http.post("/ai/run/@test/identity", json=body).status_code == 400


def test_undecodable_requests_are_4xx(http: httpx.Client) -> None:
    deaths = worker_deaths(http.get("/metrics").text)
    ragged = {"name": "matrix", "datatype": "FP32", "shape": [2, 2], "data": [[1.0], [1, 2]]}
    for body in (
        {"inputs": [ragged]},
        {"inputs": [{"name": "fp32", "datatype": "FP32", "shape": [1], "data": [{"a": 1}]}]},
        {"inputs": [{"name": "bytes", "datatype": "BYTES", "shape": [1], "data": [7]}]},
        {"inputs": [{"name": "bool", "datatype": "BOOL", "shape": [1], "data": ["yes"]}]},
        {"inputs": [{"name": "fp32", "datatype": "FP32", "shape": [1], "data": [[[[[[1]]]]], 2]}]},
        {"inputs": [], "outputs": [7]},
        {"inputs": [], "outputs": "all"},
    ):
        response = http.post("/v2/models/@test/identity/infer", json=body)
        assert 400 <= response.status_code < 500, (body, response.text)
    assert worker_deaths(http.get("/metrics").text) == deaths


def test_openapi_describes_the_v2_body(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/v2/health/live"]["get"]["security"] == []
    infer = document["paths"]["/v2/models/@test/identity/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert request["required"] == ["inputs"]
    assert set(request["properties"]) == {"id", "parameters", "inputs", "outputs"}
    tensors = request["properties"]["inputs"]["items"]["oneOf"]
    int8 = next(t for t in tensors if t["properties"]["name"]["enum"] == ["int8"])
    assert int8["properties"]["datatype"]["enum"] == ["INT8"]
    element = int8["properties"]["data"]["items"]["anyOf"][0]
    assert (element["minimum"], element["maximum"]) == (-128, 127)
    assert int8["properties"]["shape"]["maxItems"] == 1
    assert "BYTES" in document["components"]["schemas"]["v2.Datatype"]["enum"]
    run = document["paths"]["/ai/run/@test/numbers"]["post"]
    schema = run["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"ints", "floats"}
    assert "401" in run["responses"]
