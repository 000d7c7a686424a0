"""Triton's statistics extension with real compute times: after N inferences,
``get_inference_statistics`` (HTTP and gRPC, unmodified tritonclient) counts N in each compute
phase with time spent in it, and ``batch_stats`` lists the batch sizes the worker ran."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf.json_format import MessageToDict

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

PHASES = ("compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[RunningRuntime, str]]:
    with serve(FIXTURES / "packages" / "echo-models", extra=["--grpc-port", "0"]) as running:
        line = running.wait_for_line(r"KServe v2 gRPC at \S+")
        match = re.search(r"gRPC at (\S+)", line)
        assert match is not None
        yield running, match.group(1)


def _text(module: Any, value: bytes) -> Any:
    text = module.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([value], dtype=np.object_))
    return text


def _grpc_stats(address: str, model: str) -> dict[str, Any]:
    with triton_grpc.InferenceServerClient(address) as client:
        message = client.get_inference_statistics(model).model_stats[0]
    return MessageToDict(message, preserving_proto_field_name=True)


def test_each_compute_phase_is_counted_and_timed(runtime: tuple[RunningRuntime, str]) -> None:
    running, address = runtime
    http = triton_http.InferenceServerClient(running.host_port)
    for i in range(5):
        http.infer("@test/echo", [_text(triton_http, b"x" * i)])
    with triton_grpc.InferenceServerClient(address) as grpc_client:
        for _ in range(2):
            grpc_client.infer("@test/echo", [_text(triton_grpc, b"y")])
    stats = http.get_inference_statistics("@test/echo")["model_stats"][0]
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 7
    for phase in PHASES:
        assert inference[phase]["count"] == 7, (phase, inference)
        assert inference[phase]["ns"] > 0, (phase, inference)
    # The engine ran each alone: seven batches of one, each phase timed as above.
    assert stats["execution_count"] == 7
    [alone] = stats["batch_stats"]
    assert alone["batch_size"] == 1
    for phase in PHASES:
        assert alone[phase] == inference[phase]
    # gRPC says the same (protobuf's JSON writes 64-bit integers as strings).
    over_grpc = _grpc_stats(address, "@test/echo")
    for phase in PHASES:
        assert int(over_grpc["inference_stats"][phase]["count"]) == 7
        assert int(over_grpc["inference_stats"][phase]["ns"]) == inference[phase]["ns"]
    assert [int(b["batch_size"]) for b in over_grpc["batch_stats"]] == [1]
    assert int(over_grpc["batch_stats"][0]["compute_infer"]["count"]) == 7


def test_batch_stats_count_each_batch_once(runtime: tuple[RunningRuntime, str]) -> None:
    running, address = runtime

    def infer(text: str, seconds: float) -> None:
        body = {"text": text, "seconds": seconds}
        answer = httpx.post(f"{running.url}/ai/run/@test/batch", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        sizes.append(answer.json()["result"]["batch_size"])

    sizes: list[int] = []
    # One request keeps the worker busy; three that come meanwhile run as one batch after it.
    first = threading.Thread(target=infer, args=("a", 0.5))
    first.start()
    running.wait_for_line(r"batch of 1 started")
    rest = [threading.Thread(target=infer, args=(t, 0.0)) for t in "bcd"]
    for thread in rest:
        thread.start()
    time.sleep(0.2)
    for thread in [first, *rest]:
        thread.join(60)
    assert sorted(sizes) == [1, 3, 3, 3], sizes
    stats = triton_http.InferenceServerClient(running.host_port).get_inference_statistics(
        "@test/batch"
    )["model_stats"][0]
    assert stats["inference_count"] == 4 and stats["execution_count"] == 2
    inference = stats["inference_stats"]
    by_size = {b["batch_size"]: b for b in stats["batch_stats"]}
    assert sorted(by_size) == [1, 3]
    for phase in PHASES:
        assert inference[phase]["count"] == 4
        assert by_size[1][phase]["count"] == by_size[3][phase]["count"] == 1
        # Each request of the batch of three carries the batch's time (as Triton counts it);
        # the batch itself counts it once.
        assert inference[phase]["ns"] == by_size[1][phase]["ns"] + 3 * by_size[3][phase]["ns"]
    assert by_size[1]["compute_infer"]["ns"] >= 500_000_000  # it slept half a second
    over_grpc = _grpc_stats(address, "@test/batch")
    assert sorted(int(b["batch_size"]) for b in over_grpc["batch_stats"]) == [1, 3]
    assert int(over_grpc["execution_count"]) == 2
