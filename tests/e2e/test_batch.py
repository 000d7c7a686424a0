"""The asynchronous batch API: queueRequest, polling by request_id, durability across kill -9."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

ECHO = "@test/echo"
SLEEPY = "@scale/sleepy"
ADMIN = {"Authorization": "Bearer batch-admin"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRuntime]:
    folder = tmp_path_factory.mktemp("batch")
    config = folder / "omni.toml"
    config.write_text('[server]\nbatch_max_size = "64KiB"\n')
    with serve(
        FIXTURES / "packages" / "echo-models",
        extra=["--config", str(config), "--state-dir", str(folder / "state")],
        env={"OMNI_ADMIN_TOKEN": "batch-admin"},
    ) as running:
        yield running


def _submit(url: str, model: str, requests: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/ai/run/{model}", params={"queueRequest": "true"}, json=requests, timeout=30
    )


def _wait(url: str, model: str, request_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{url}/ai/run/{model}", json={"request_id": request_id}, timeout=30)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["result"]
        if "responses" in result:
            return result
        assert result["status"] in ("queued", "running")
        assert time.monotonic() < deadline, result
        time.sleep(0.2)


def test_a_batch_is_queued_then_answered_item_by_item(runtime: RunningRuntime) -> None:
    requests = {
        "requests": [
            {"text": "a", "external_reference": "first"},
            {"text": 5},  # invalid: fails alone, with its error
            {"text": "c", "count": 2},
        ]
    }
    response = _submit(runtime.url, ECHO, requests)
    assert response.status_code == 200, response.text
    queued = response.json()
    assert queued["success"] is True and queued["result"]["status"] == "queued"
    assert queued["result"]["model"] == ECHO
    result = _wait(runtime.url, ECHO, queued["result"]["request_id"])
    responses = result["responses"]
    assert [r["id"] for r in responses] == [0, 1, 2]
    assert responses[0]["success"] and responses[0]["result"]["text"] == "a"
    assert responses[0]["external_reference"] == "first"
    assert not responses[1]["success"] and "'text'" in responses[1]["error"]["message"]
    assert responses[2]["result"]["text"] == "cc"
    assert set(result["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_malformed_submissions_name_the_field(runtime: RunningRuntime) -> None:
    for body, field in (
        ({"requests": []}, "'requests'"),
        ({"nothing": 1}, "'requests'"),
        ({"requests": [1]}, "requests[0]"),
        ({"requests": [{"text": "x", "external_reference": 3}]}, "external_reference"),
    ):
        response = _submit(runtime.url, ECHO, body)
        assert response.status_code == 400, body
        assert field in response.json()["errors"][0]["message"]
    big = {"requests": [{"text": "x" * 1000}] * 100}
    response = _submit(runtime.url, ECHO, big)
    assert response.status_code == 413
    assert "server.batch_max_size" in response.json()["errors"][0]["message"]


def test_unknown_request_ids_get_404(runtime: RunningRuntime) -> None:
    response = httpx.post(f"{runtime.url}/ai/run/{ECHO}", json={"request_id": "nope"})
    assert response.status_code == 404 and response.json()["success"] is False
    queued = _submit(runtime.url, ECHO, {"requests": [{"text": "x"}]}).json()["result"]
    other = httpx.post(
        f"{runtime.url}/ai/run/@test/batch", json={"request_id": queued["request_id"]}
    )
    assert other.status_code == 404  # a batch of another model


def test_operators_list_batches_with_the_admin_token(runtime: RunningRuntime) -> None:
    assert httpx.get(f"{runtime.url}/ai/batch").status_code == 401
    listed = httpx.get(f"{runtime.url}/ai/batch", headers=ADMIN).json()["result"]
    assert listed and {"request_id", "model", "status", "total", "done"} <= set(listed[0])
    metrics = httpx.get(f"{runtime.url}/metrics").text
    assert 'omni_batch_items{state="done"}' in metrics


def test_a_batch_survives_kill_9_and_every_item_appears_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    packages = FIXTURES / "packages" / "scaling-models"
    count = 24
    with serve(packages, extra=["--state-dir", str(state)]) as first:
        body = {"requests": [{"seconds": 0.1} for _ in range(count)]}
        request_id = _submit(first.url, SLEEPY, body).json()["result"]["request_id"]
        deadline = time.monotonic() + 60
        while True:  # some done, some not: then the runtime dies without a word
            poll = httpx.post(f"{first.url}/ai/run/{SLEEPY}", json={"request_id": request_id})
            status = poll.json()["result"]
            if status.get("done", 0) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert 3 <= status.get("done", 0) < count, status
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    with serve(packages, extra=["--state-dir", str(state)]) as second:
        result = _wait(second.url, SLEEPY, request_id)
    responses = result["responses"]
    assert [r["id"] for r in responses] == list(range(count))  # each exactly once
    assert all(r["success"] for r in responses)
