"""A small infer request is answered by its connection (server/hot_path.py), and the answer is
the one the ASGI application gives: the same status, headers and body, errors and tokens
included. A query string (ignored by the infer route) sends the same request through ASGI."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

TOKEN = "hot-secret"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture(scope="module")
def runtime() -> Iterator[RunningRuntime]:
    packages = FIXTURES / "packages"
    with serve(
        packages / "echo-models", packages / "tensor-models", env={"OMNI_API_TOKEN": TOKEN}
    ) as running:
        yield running


def _exchange(runtime: RunningRuntime, data: bytes, answers: int = 1) -> list[bytes]:
    """Send ``data`` on a new connection; the ``answers`` answers, whole, as sent."""
    host, port = runtime.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        received, out = b"", []
        while len(out) < answers:
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                head = received[:end].lower()
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(received) >= end + 4 + length:
                    out.append(received[: end + 4 + length])
                    received = received[end + 4 + length :]
                    continue
            chunk = sock.recv(65536)
            assert chunk, f"the runtime closed the connection after {out}"
            received += chunk
        return out


def _post(path: str, body: bytes, extra: str = AUTH) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.startswith(b"date: "))


def _both_ways(runtime: RunningRuntime, model: str, body: bytes, extra: str = AUTH) -> bytes:
    """The answer to ``body`` on the hot path and through ASGI: asserted equal, returned."""
    path = f"/v2/models/{model}/infer"
    [hot] = _exchange(runtime, _post(path, body, extra))
    [asgi] = _exchange(runtime, _post(path + "?via=asgi", body, extra))
    assert _without_date(hot) == _without_date(asgi)
    return hot


def _v2(name: str, datatype: str, data: list[object]) -> bytes:
    tensor = {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def test_answers_are_the_same_both_ways(runtime: RunningRuntime) -> None:
    answer = _both_ways(runtime, "@test/identity", _v2("fp32", "FP32", [0.5, 1.5]))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"omni-model-version: " in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["outputs"][0]["data"] == [0.5, 1.5]
    values = [i / 8 for i in range(1000)]  # an answer large enough to be compressed
    answer = _both_ways(
        runtime, "@test/identity", _v2("fp32", "FP32", values), AUTH + "Accept-Encoding: gzip\r\n"
    )
    assert b"content-encoding: gzip" in answer


def test_binary_tensors_are_the_same_both_ways(runtime: RunningRuntime) -> None:
    raw = struct.pack("<3f", 1.0, 2.0, 3.0)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "fp32",
                    "datatype": "FP32",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "fp32", "parameters": {"binary_data": True}}],
        }
    ).encode()
    extra = AUTH + f"Inference-Header-Content-Length: {len(header)}\r\n"
    answer = _both_ways(runtime, "@test/identity", header + raw, extra)
    assert b"inference-header-content-length: " in answer
    assert answer.endswith(raw)


@pytest.mark.parametrize(
    ("body", "extra", "status"),
    [
        (b"{not json", AUTH, b"400"),
        (_v2("nope", "FP32", [1.0]), AUTH, b"400"),
        (_v2("fp32", "FP32", [1.0]), AUTH + "Inference-Header-Content-Length: 999\r\n", b"400"),
        (_v2("fp32", "FP32", [1.0]), AUTH + "Inference-Header-Content-Length: x\r\n", b"400"),
        (_v2("fp32", "FP32", [1.0]), "Authorization: Bearer wrong\r\n", b"401"),
        (_v2("fp32", "FP32", [1.0]), "", b"401"),
    ],
    ids=["json", "input", "header-length", "header-length-text", "bad-token", "no-token"],
)
def test_errors_are_the_same_both_ways(
    runtime: RunningRuntime, body: bytes, extra: str, status: bytes
) -> None:
    answer = _both_ways(runtime, "@test/identity", body, extra)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_an_unknown_model_and_version_are_refused_as_before(runtime: RunningRuntime) -> None:
    body = _v2("fp32", "FP32", [1.0])
    assert _both_ways(runtime, "@test/none", body).startswith(b"HTTP/1.1 404")
    [answer] = _exchange(runtime, _post("/v2/models/@test/identity/versions/9/infer", body))
    assert answer.startswith(b"HTTP/1.1 404")
    [answer] = _exchange(runtime, _post("/v2/models/@test/identity/versions/1/infer", body))
    assert answer.startswith(b"HTTP/1.1 200")


def test_pipelined_requests_keep_their_order(runtime: RunningRuntime) -> None:
    path = "/v2/models/@test/identity/infer"
    data = (
        _post(path, _v2("fp32", "FP32", [1.0]))
        + f"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n{AUTH}\r\n".encode()
        + _post(path, _v2("fp32", "FP32", [3.0]))
    )
    first, ready, third = _exchange(runtime, data, 3)
    assert b'"data": [1.0]' in first or b'"data":[1.0]' in first
    assert ready.startswith(b"HTTP/1.1 200")
    assert b'"data": [3.0]' in third or b'"data":[3.0]' in third
