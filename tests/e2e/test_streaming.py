"""Streaming engines: /ai/run with "stream": true answers server-sent events as chunks come."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

MODELS = ["@test/words", "@test/async-words"]


@pytest.fixture(scope="module")
def runtime() -> Iterator[RunningRuntime]:
    with serve(FIXTURES / "packages" / "stream-models") as running:
        yield running


def _events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


@pytest.mark.parametrize("model", MODELS)
def test_each_chunk_is_an_event_then_done(runtime: RunningRuntime, model: str) -> None:
    body = {"prompt": "a b c", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{runtime.url}/ai/run/{model}", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = list(_events(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["response"] for c in chunks] == ["a ", "b ", "c ", "a "]
    assert chunks[-1]["finished"] is True


@pytest.mark.parametrize("model", MODELS)
def test_the_first_event_comes_before_the_generator_finishes(
    runtime: RunningRuntime, model: str
) -> None:
    body = {"prompt": "slow", "max_tokens": 6, "delay": 0.3, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{runtime.url}/ai/run/{model}", json=body, timeout=60) as response:
        events = _events(response)
        first = next(events)
        first_at = time.monotonic() - started
        rest = list(events)
    total = time.monotonic() - started
    assert json.loads(first)["response"] == "slow "
    assert rest[-1] == "[DONE]" and len(rest) == 6
    assert first_at < total / 2  # ratios in one run, not absolute times


@pytest.mark.parametrize("model", MODELS)
def test_without_stream_the_chunks_are_joined(runtime: RunningRuntime, model: str) -> None:
    response = httpx.post(
        f"{runtime.url}/ai/run/{model}", json={"prompt": "x y", "max_tokens": 3}, timeout=60
    )
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    # Strings concatenated, lists extended, the rest from the last chunk.
    assert result == {"response": "x y x ", "tokens": [0, 1, 2], "finished": True}
    client = triton.InferenceServerClient(urlsplit(runtime.url).netloc)
    prompt = triton.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"v2 too"], dtype=np.object_))
    answer = client.infer(model, [prompt])
    assert answer.as_numpy("response")[0] == b"v2 too v2 too v2 "


def test_an_error_before_the_first_chunk_is_a_plain_json_error(runtime: RunningRuntime) -> None:
    body = {"prompt": 3, "stream": True}
    response = httpx.post(f"{runtime.url}/ai/run/@test/words", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["success"] is False and "prompt" in response.text


def test_an_error_mid_stream_is_an_error_event(runtime: RunningRuntime) -> None:
    body = {"prompt": "fail", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{runtime.url}/ai/run/@test/words", json=body, timeout=60) as r:
        text = r.read().decode()
    assert text.count('data: {"response"') == 2
    assert "event: error" in text and "the generator broke" in text
    assert "[DONE]" not in text


def _abandoned(runtime: RunningRuntime, model: str) -> int:
    response = httpx.post(
        f"{runtime.url}/ai/run/{model}", json={"prompt": "abandoned?"}, timeout=60
    )
    return int(response.json()["result"]["response"])


@pytest.mark.parametrize("model", MODELS)
def test_a_client_that_goes_away_cancels_the_generator(runtime: RunningRuntime, model: str) -> None:
    before = _abandoned(runtime, model)
    url = urlsplit(runtime.url)
    body = json.dumps({"prompt": "long", "max_tokens": 200, "delay": 0.05, "stream": True})
    request = (
        f"POST /ai/run/{model} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    # The connection is closed after the first event: the generator must stop long before
    # its 200 words (10 s) are done.
    deadline = time.monotonic() + 8
    while _abandoned(runtime, model) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _abandoned(runtime, model) == before + 1
