"""The Workers-AI-style API, bad input of every kind, metrics and OpenAPI."""

from __future__ import annotations

import concurrent.futures
import json
import struct
from typing import Any

import httpx

from tests.e2e.runtime import RunningRuntime, metric


def _errors(response: httpx.Response) -> list[dict[str, object]]:
    body = response.json()
    assert body["success"] is False
    assert body["result"] is None
    return body["errors"]  # type: ignore[no-any-return]


def test_run_returns_the_envelope(http: httpx.Client) -> None:
    response = http.post("/ai/run/@test/echo", json={"text": "ab", "count": 2, "values": [1, 2]})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["errors"] == [] and body["messages"] == []
    assert body["result"]["text"] == "abab"
    assert body["result"]["total"] == 3.0


def test_invalid_input_names_the_field(http: httpx.Client) -> None:
    response = http.post("/ai/run/@test/echo", json={"text": "x", "count": "many"})
    assert response.status_code == 400
    [error] = _errors(response)
    assert error["code"] == 5006
    assert "model '@test/echo'" in str(error["message"])
    assert "input 'count'" in str(error["message"])


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post("/ai/run/@test/echo", content=b'{"text": ')
    assert response.status_code == 400
    assert "not valid JSON" in str(_errors(response)[0]["message"])
    response = http.post("/v2/models/@test/echo/infer", content=b"[1, 2")
    assert response.status_code == 400
    assert "model '@test/echo'" in response.json()["error"]


def test_unknown_model_is_404(http: httpx.Client) -> None:
    response = http.post("/ai/run/@cf/nobody/nothing", json={"text": "x"})
    assert response.status_code == 404
    [error] = _errors(response)
    assert error["code"] == 5007
    assert "unknown model '@cf/nobody/nothing'" in str(error["message"])
    assert http.post("/v2/models/@cf/nobody/infer", json={"inputs": []}).status_code == 404


def test_oversized_body_is_413(http: httpx.Client) -> None:
    response = http.post("/ai/run/@test/echo", json={"text": "x" * (2 << 20)})
    assert response.status_code == 413
    assert "larger than the server's limit" in str(_errors(response)[0]["message"])
    assert http.post("/ai/run/@test/echo", json={"text": "still fine"}).status_code == 200


def test_wrong_shape_and_datatype(http: httpx.Client) -> None:
    def infer(tensor: dict[str, object]) -> httpx.Response:
        return http.post("/v2/models/@test/echo/infer", json={"inputs": [tensor]})

    response = infer({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]})
    assert response.status_code == 400
    assert "input 'text' has shape [2], expected [1]" in response.json()["error"]
    response = infer({"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]})
    assert response.status_code == 200
    response = http.post(
        "/v2/models/@test/echo/infer",
        json={
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                {"name": "matrix", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]},
            ]
        },
    )
    assert response.status_code == 400
    assert "input 'matrix': shape [2, 2] holds 4 elements, got 3" in response.json()["error"]
    response = infer({"name": "text", "datatype": "INT64", "shape": [1], "data": [1]})
    assert "datatype INT64, expected BYTES" in response.json()["error"]


def test_binary_body_shorter_than_its_header_says(http: httpx.Client) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 100},
                }
            ]
        }
    ).encode()
    body = header + struct.pack("<I", 2) + b"hi"
    response = http.post(
        "/v2/models/@test/echo/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "binary_data_size is 100 but only 6 bytes" in response.json()["error"]
    response = http.post(
        "/v2/models/@test/echo/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(body) + 10)},
    )
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]


def test_model_errors_are_5xx_and_the_worker_survives(http: httpx.Client) -> None:
    response = http.post("/ai/run/@test/fail", json={"text": "x"})
    assert response.status_code == 500
    assert "model '@test/fail' failed: ValueError: cannot handle 'x'" in str(
        _errors(response)[0]["message"]
    )
    response = http.post("/ai/run/@test/bad-return", json={"text": "x"})
    assert response.status_code == 500
    assert "returned a bad response: expected Text, got int" in str(_errors(response)[0]["message"])
    assert http.post("/ai/run/@test/fail", json={"text": "y"}).status_code == 500


def test_crash_costs_only_the_crashing_model(http: httpx.Client, runtime: RunningRuntime) -> None:
    pid_before = http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"]
    mark = len(runtime.lines)
    response = http.post("/ai/run/@test/fail", json={"text": "crash"})
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "exited with status 7 while serving this request" in str(_errors(response)[0]["message"])
    # Another model keeps serving from the same worker while the crashed one restarts.
    after = http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"]
    assert after == pid_before
    runtime.wait_for_line(r"model '@test/fail' ready", start=mark)
    response = http.post("/ai/run/@test/fail", json={"text": "x"})
    assert response.status_code == 500  # the engine's own error again: it is back


def test_reject_if_busy_is_429_with_code_3040(http: httpx.Client, runtime: RunningRuntime) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            lambda: httpx.post(
                f"{runtime.url}/ai/run/@test/gate", json={"action": "wait"}, timeout=30
            )
        )
        try:
            for _ in range(2000):
                response = http.post(
                    "/ai/run/@test/gate", json={"action": "echo", "options": {"rejectIfBusy": True}}
                )
                if response.status_code == 429:
                    break
            assert response.status_code == 429
            assert _errors(response)[0]["code"] == 3040
        finally:
            http.post("/ai/run/@test/gate", json={"action": "open"})
        assert waiting.result().json()["result"]["text"] == "wait"


def test_requests_that_arrive_together_reach_infer_batch_together(
    runtime: RunningRuntime,
) -> None:
    def run(body: dict[str, object]) -> Any:
        response = httpx.post(f"{runtime.url}/ai/run/@test/batch", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    mark = len(runtime.lines)
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        first = pool.submit(run, {"text": "hold", "seconds": 1.0})
        runtime.wait_for_line(r"batch of 1 started", start=mark)  # its worker is busy now
        # These arrive while it works: the worker hands them to infer_batch together.
        rest = [pool.submit(run, {"text": f"t{i}"}) for i in range(6)]
        answers = [future.result() for future in rest]
    assert first.result() == {"text": "HOLD", "batch_size": 1}
    assert [a["text"] for a in answers] == [f"T{i}" for i in range(6)]
    assert max(a["batch_size"] for a in answers) > 1, answers


def _crashes(metrics: str, model: str) -> float:
    return metric(metrics, "omni_model_evictions_total", model=model, reason="crash")


def test_metrics(http: httpx.Client, runtime: RunningRuntime) -> None:
    crashes = _crashes(http.get("/metrics").text, "@test/fail")
    http.post("/ai/run/@test/echo", json={"text": "x"})
    assert http.post("/ai/run/@test/fail", json={"text": "x"}).status_code == 500  # it is up
    mark = len(runtime.lines)
    assert http.post("/ai/run/@test/fail", json={"text": "crash"}).status_code == 503
    runtime.wait_for_line(r"model '@test/fail' ready", start=mark)  # back, for the tests after
    text = http.get("/metrics").text
    # Every per-model metric names the model and the version that served (its package's).
    echo = {"model": "@test/echo", "version": "0.1.0"}
    assert 'omni_requests_total{model="@test/echo",status="200",version="0.1.0"}' in text
    assert metric(text, "omni_requests_total", status="200", **echo) >= 1
    assert metric(text, "omni_request_duration_seconds_count", **echo) >= 1
    assert metric(text, "omni_model_replicas", **echo) == 1
    assert metric(text, "omni_model_cold_starts_total", **echo) >= 1
    assert metric(text, "omni_model_memory_bytes", kind="host", **echo) > 0
    assert _crashes(text, "@test/fail") == crashes + 1


def test_openapi_documents_every_model(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    run = spec["paths"]["/ai/run/@test/echo"]["post"]
    schema = run["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["text"]
    assert "count" in schema["properties"]
    assert "/v2/models/@test/echo/infer" in spec["paths"]


def test_hostile_bodies_cost_one_request(http: httpx.Client) -> None:
    pid = http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"]
    deep = b"[" * 200_000
    response = http.post("/ai/run/@test/echo", content=deep)
    assert response.status_code == 400
    assert "not valid JSON" in str(_errors(response)[0]["message"])
    response = http.post("/v2/models/@test/echo/infer", content=deep)
    assert response.status_code == 400
    busy = b'{"options": {"rejectIfBusy": true}, "x": ' + b"[" * 200_000
    assert http.post("/ai/run/@test/echo", content=busy).status_code == 400
    assert http.post("/v2/repository/index", content=b"\xc3\x28").status_code == 400
    assert http.get("/ai/run/@test/echo").status_code == 405
    # The same worker answers: none of that reached past its request.
    assert http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"] == pid


def test_long_log_lines_do_not_stall_a_worker(http: httpx.Client) -> None:
    for _ in range(3):  # 300 KB of output without a newline between prints' ends
        assert http.post("/ai/run/@test/echo", json={"text": "shout"}).status_code == 200
