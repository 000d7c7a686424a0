"""Streaming engines as Triton's decoupled models: gRPC ModelStreamInfer answers one response
per chunk, then (when asked) an empty final response, through an unmodified tritonclient.grpc."""

from __future__ import annotations

import queue
import re
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.runtime import RunningRuntime, serve

MODELS = ["@test/counting-stream", "@test/async-counting-stream"]

ENGINES = """
import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from pydantic import BaseModel

from omni_sdk import Engine, hookimpl


class Prompt(BaseModel):
    prompt: str
    count: int = 3


class Piece(BaseModel):
    text: str
    index: int
    scores: list[float] = []


def _piece(request: Prompt, index: int) -> Piece:
    if request.prompt == "fail" and index == 1:
        raise RuntimeError("the generator broke after one chunk")
    return Piece(text=f"{request.prompt}-{index}", index=index, scores=[float(index)] * (index + 1))


class CountingStream(Engine):
    name = "@test/counting-stream"
    task = "text-generation"
    abandoned = 0  # streams whose client went away

    def infer(self, request: Prompt) -> Iterator[Piece]:
        if request.prompt == "abandoned?":
            yield Piece(text=str(CountingStream.abandoned), index=0)
            return
        try:
            for index in range(request.count):
                if request.prompt == "slow":
                    time.sleep(0.1)
                yield _piece(request, index)
        except GeneratorExit:
            CountingStream.abandoned += 1
            raise


class AsyncCountingStream(Engine):
    name = "@test/async-counting-stream"
    task = "text-generation"

    async def infer(self, request: Prompt) -> AsyncIterator[Piece]:
        for index in range(request.count):
            await asyncio.sleep(0)
            yield _piece(request, index)


@hookimpl
def register_engines(register):
    register(CountingStream)
    register(AsyncCountingStream)
"""


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRuntime]:
    root = tmp_path_factory.mktemp("decoupled")
    package = root / "counting-stream"
    (package / "counting_stream").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "omni-test-counting-stream"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        counting = "counting_stream"
        """)
    )
    (package / "counting_stream" / "__init__.py").write_text(ENGINES)
    extra = ["--state-dir", str(root / "state"), "--grpc-port", "0"]
    with serve(root, extra=extra, timeout=240) as running:
        yield running


@pytest.fixture()
def client(runtime: RunningRuntime) -> Iterator[grpcclient.InferenceServerClient]:
    line = runtime.wait_for_line(r"KServe v2 gRPC at \S+")
    match = re.search(r"gRPC at (\S+)", line)
    assert match is not None
    with grpcclient.InferenceServerClient(match.group(1)) as grpc_client:
        yield grpc_client


def _inputs(prompt: str, count: int) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    number = grpcclient.InferInput("count", [1], "INT64")
    number.set_data_from_numpy(np.array([count], dtype=np.int64))
    return [text, number]


def _stream(
    client: grpcclient.InferenceServerClient, requests: list[tuple[str, str, int]], model: str
) -> list[tuple[Any, Any]]:
    """Send ``(id, prompt, count)`` requests on one stream, asking for the final flag; every
    (result, error) the callback got, once every request has had its final response."""
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        for request_id, prompt, count in requests:
            client.async_stream_infer(
                model,
                _inputs(prompt, count),
                request_id=request_id,
                enable_empty_final_response=True,
            )
        answers: list[tuple[Any, Any]] = []
        finals = 0
        while finals < len(requests):
            result, error = received.get(timeout=60)
            answers.append((result, error))
            if error is not None or _final(result):
                finals += 1
        return answers
    finally:
        client.stop_stream()


def _final(result: Any) -> bool:
    parameter = result.get_response().parameters.get("triton_final_response")
    assert parameter is not None, "every response carries triton_final_response when asked"
    return bool(parameter.bool_param)


@pytest.mark.parametrize("model", MODELS)
def test_one_response_per_chunk_then_an_empty_final_one(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    answers = _stream(client, [("r-1", "word", 3)], model)
    assert [error for _, error in answers] == [None] * 4
    *chunks, (last, _) = answers
    for index, (result, _) in enumerate(chunks):
        assert result.get_response().id == "r-1" and not _final(result)
        assert result.as_numpy("text").tolist() == [f"word-{index}".encode()]
        assert result.as_numpy("index").tolist() == [index]
        assert result.as_numpy("scores").tolist() == [float(index)] * (index + 1)
    assert _final(last) and last.get_response().id == "r-1"
    assert not last.get_response().outputs, "the final response is empty"


def test_requests_on_one_stream_are_told_apart_by_id(
    client: grpcclient.InferenceServerClient,
) -> None:
    answers = _stream(client, [("a", "alpha", 2), ("b", "beta", 4)], MODELS[0])
    by_id: dict[str, list[str]] = {"a": [], "b": []}
    for result, error in answers:
        assert error is None
        if not _final(result):
            by_id[result.get_response().id].append(result.as_numpy("text")[0].decode())
    assert by_id == {"a": ["alpha-0", "alpha-1"], "b": [f"beta-{i}" for i in range(4)]}


@pytest.mark.parametrize("model", MODELS)
def test_a_failure_after_a_chunk_is_that_requests_error(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    answers = _stream(client, [("f", "fail", 3)], model)
    (first, none), (_, error) = answers
    assert none is None and first.as_numpy("text").tolist() == [b"fail-0"]
    assert isinstance(error, InferenceServerException)
    assert "the generator broke after one chunk" in str(error) and model in str(error)


def test_without_the_final_flag_only_the_chunks_come(
    client: grpcclient.InferenceServerClient,
) -> None:
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    client.async_stream_infer(MODELS[0], _inputs("plain", 2), request_id="p")
    client.stop_stream()  # waits for the server to end the stream: every answer is in
    answers = [received.get_nowait() for _ in range(received.qsize())]
    assert [r.as_numpy("text")[0] for r, _ in answers] == [b"plain-0", b"plain-1"]
    assert all("triton_final_response" not in r.get_response().parameters for r, _ in answers)


def test_model_infer_refuses_a_decoupled_model_as_triton_does(
    client: grpcclient.InferenceServerClient, runtime: RunningRuntime
) -> None:
    with pytest.raises(InferenceServerException, match="decoupled transaction policy") as error:
        client.infer(MODELS[0], _inputs("x", 1))
    assert "UNIMPLEMENTED" in str(error.value.status())
    assert client.get_model_config(MODELS[0]).config.model_transaction_policy.decoupled
    http = httpclient.InferenceServerClient(runtime.host_port)
    try:
        config = http.get_model_config(MODELS[0])
        assert config["model_transaction_policy"] == {"decoupled": True}
        # Over HTTP the chunks are joined into one answer, as before.
        text = httpclient.InferInput("prompt", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"joined"], dtype=np.object_))
        answer = http.infer(MODELS[0], [text])
        assert answer.as_numpy("text").tolist() == [b"joined-0joined-1joined-2"]
    finally:
        http.close()


def test_a_client_that_cancels_its_stream_stops_the_generator(
    client: grpcclient.InferenceServerClient,
) -> None:
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        client.async_stream_infer(MODELS[0], _inputs("slow", 600), request_id="s")
        first, error = received.get(timeout=60)
        assert error is None and first.as_numpy("text").tolist() == [b"slow-0"]
    finally:
        client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while True:  # (the worker notices between two chunks)
        answers = _stream(client, [("q", "abandoned?", 1)], MODELS[0])
        if answers[0][0].as_numpy("text").tolist() == [b"1"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answers[0][0].as_numpy("text").tolist() == [b"1"], "the generator ran on"
