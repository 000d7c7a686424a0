"""Sequences (Triton's sequence batcher) through an unmodified tritonclient: a stateful Python
engine whose sequences each stay on one of two replicas, and a zero-code ONNX graph whose
control inputs the runtime fills."""

from __future__ import annotations

import re
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.e2e.runtime import RunningRuntime, serve

ACCUMULATOR = "@test/accumulator"
PLAIN = "@test/plain-counter"
GRAPH = "@test/sequence-graph"

ENGINES = '''
import os
import random
import time

from pydantic import BaseModel

from omni_sdk import Engine, hookimpl


class Step(BaseModel):
    INPUT: int
    START: bool = False  # the control inputs: filled by the runtime, hidden from metadata
    END: bool = False
    READY: int = 0
    CORRID: str = ""


class Total(BaseModel):
    OUTPUT: int
    REPLICA: int


class Accumulator(Engine):
    """A running total per sequence, held in this replica's memory."""

    name = "@test/accumulator"
    task = "tabular-regression"

    def load(self, ctx):
        self.totals = {}
        self.replica = random.getrandbits(48)  # (every worker is pid 1 in its namespace)

    def infer(self, request: Step) -> Total:
        if request.READY != 1 or not request.CORRID:
            raise ValueError(f"control inputs not filled: {request!r}")
        if request.INPUT == -999:
            os._exit(3)  # the replica dies, and the state of its sequences with it
        if request.START:
            self.totals[request.CORRID] = 0
        if request.CORRID not in self.totals:
            raise ValueError(f"sequence {request.CORRID} is not on replica {self.replica}")
        time.sleep(0.02)  # long enough for concurrent sequences to spread over replicas
        self.totals[request.CORRID] += request.INPUT
        total = self.totals[request.CORRID]
        if request.END:
            del self.totals[request.CORRID]
        return Total(OUTPUT=total, REPLICA=self.replica)


class Count(BaseModel):
    INPUT: int


class PlainCounter(Engine):
    name = "@test/plain-counter"
    task = "tabular-regression"

    def infer(self, request: Count) -> Count:
        return Count(INPUT=request.INPUT + 1)


@hookimpl
def register_engines(register):
    register(Accumulator)
    register(PlainCounter)
'''


def _python_package(root: Path) -> None:
    package = root / "sequence-models"
    (package / "sequence_models").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "omni-test-sequence-models"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        sequences = "sequence_models"
        """)
    )
    (package / "sequence_models" / "__init__.py").write_text(ENGINES)
    (package / "omni.toml").write_text(
        textwrap.dedent(f"""
        [models."{ACCUMULATOR}".scaling]
        min_replicas = 2
        max_replicas = 2

        [models."{ACCUMULATOR}".sequence]
        start = "START"
        end = "END"
        ready = "READY"
        correlation_id = "CORRID"
        idle_timeout = "1s"
        """)
    )


def _graph_package(root: Path) -> None:
    """OUTPUT = INPUT + 100·START + 1000·END + 10000·READY, and CORR = CORRID: the answer shows
    what the runtime filled in."""
    package = root / "sequence-graph"
    package.mkdir()
    tensors = {
        name: helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 1])
        for name in ("INPUT", "START", "END", "READY", "OUTPUT")
    }
    corrid = helper.make_tensor_value_info("CORRID", TensorProto.INT64, ["batch", 1])
    corr = helper.make_tensor_value_info("CORR", TensorProto.INT64, ["batch", 1])
    weights = [
        helper.make_tensor(f"w_{name}", TensorProto.INT32, [1], [weight])
        for name, weight in (("START", 100), ("END", 1000), ("READY", 10000))
    ]
    nodes = [
        helper.make_node("Mul", ["START", "w_START"], ["s"]),
        helper.make_node("Mul", ["END", "w_END"], ["e"]),
        helper.make_node("Mul", ["READY", "w_READY"], ["r"]),
        helper.make_node("Add", ["INPUT", "s"], ["t1"]),
        helper.make_node("Add", ["t1", "e"], ["t2"]),
        helper.make_node("Add", ["t2", "r"], ["OUTPUT"]),
        helper.make_node("Identity", ["CORRID"], ["CORR"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence",
        [tensors[n] for n in ("INPUT", "START", "END", "READY")] + [corrid],
        [tensors["OUTPUT"], corr],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(package / "sequence.onnx"))
    (package / "omni.toml").write_text(
        textwrap.dedent(f"""
        [model]
        name = "{GRAPH}"
        task = "tabular-regression"
        kind = "onnx"
        file = "sequence.onnx"
        max_batch_size = 4

        [model.sequence]
        start = "START"
        end = "END"
        ready = "READY"
        correlation_id = "CORRID"
        """)
    )


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRuntime]:
    root = tmp_path_factory.mktemp("sequences")
    _python_package(root)
    _graph_package(root)
    extra = ["--state-dir", str(root / "state"), "--grpc-port", "0"]
    with serve(root, extra=extra, timeout=240) as running:
        yield running


@pytest.fixture()
def http(runtime: RunningRuntime) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(runtime.host_port, concurrency=8)
    yield client
    client.close()


@pytest.fixture()
def grpc(runtime: RunningRuntime) -> Iterator[grpcclient.InferenceServerClient]:
    line = runtime.wait_for_line(r"KServe v2 gRPC at \S+")
    match = re.search(r"gRPC at (\S+)", line)
    assert match is not None
    with grpcclient.InferenceServerClient(match.group(1)) as client:
        yield client


def _step(client: httpclient.InferenceServerClient, value: int, **sequence: object) -> tuple:
    tensor = httpclient.InferInput("INPUT", [1], "INT64")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int64))
    result = client.infer(ACCUMULATOR, [tensor], **sequence)  # type: ignore[arg-type]
    return int(result.as_numpy("OUTPUT")[0]), int(result.as_numpy("REPLICA")[0])


def test_each_sequence_keeps_its_state_on_one_replica(
    http: httpclient.InferenceServerClient,
) -> None:
    """Eight sequences at once over two replicas: every total is right only if every request
    of a sequence reaches the replica that holds its state."""
    values = [[1, 2, 3, 4, 5], [10, 20, 30], [7, 7, 7, 7], [100, 1], [3, 3, 3], [2, 4], [9], [5, 6]]

    def run(index: int) -> tuple[list[int], set[int]]:
        sequence_id = f"seq-{index}"
        totals, pids = [], set()
        for position, value in enumerate(values[index]):
            total, pid = _step(
                http,
                value,
                sequence_id=sequence_id,
                sequence_start=position == 0,
                sequence_end=position == len(values[index]) - 1,
            )
            totals.append(total)
            pids.add(pid)
        return totals, pids

    with ThreadPoolExecutor(len(values)) as pool:
        outcomes = list(pool.map(run, range(len(values))))
    for index, (totals, pids) in enumerate(outcomes):
        assert totals == list(np.cumsum(values[index])), (index, totals)
        assert len(pids) == 1, f"sequence {index} was answered by replicas {pids}"
    every_pid = set().union(*(pids for _, pids in outcomes))
    assert len(every_pid) == 2, "the sequences did not spread over both replicas"


def test_a_sequence_over_grpc_with_an_integer_id(
    grpc: grpcclient.InferenceServerClient, http: httpclient.InferenceServerClient
) -> None:
    """gRPC carries the parameters too; an integer id reaches a BYTES correlation input as its
    digits; the id is one sequence whichever protocol continues it."""

    def step(value: int, **sequence: object) -> int:
        tensor = grpcclient.InferInput("INPUT", [1], "INT64")
        tensor.set_data_from_numpy(np.array([value], dtype=np.int64))
        result = grpc.infer(ACCUMULATOR, [tensor], **sequence)  # type: ignore[arg-type]
        return int(result.as_numpy("OUTPUT")[0])

    assert step(5, sequence_id=42, sequence_start=True) == 5
    assert step(6, sequence_id=42) == 11
    assert _step(http, 1, sequence_id=42)[0] == 12
    assert step(1, sequence_id=42, sequence_end=True) == 13
    with pytest.raises(InferenceServerException, match="sequence 42 is not live"):
        step(1, sequence_id=42)


def test_requests_outside_a_live_sequence_are_refused(
    http: httpclient.InferenceServerClient, runtime: RunningRuntime
) -> None:
    with pytest.raises(InferenceServerException, match="sequence 'never-started' is not live"):
        _step(http, 1, sequence_id="never-started")
    with pytest.raises(InferenceServerException, match="needs the parameter 'sequence_id'"):
        _step(http, 1)
    answer = httpx.post(f"{runtime.url}/ai/run/{ACCUMULATOR}", json={"INPUT": 1}, timeout=30)
    assert answer.status_code == 400
    assert "keeps state per sequence" in answer.json()["errors"][0]["message"]
    # A start on a live id begins it again.
    assert _step(http, 4, sequence_id="again", sequence_start=True)[0] == 4
    assert _step(http, 4, sequence_id="again", sequence_start=True)[0] == 4
    assert _step(http, 1, sequence_id="again", sequence_end=True)[0] == 5


def test_an_idle_sequence_ends_after_its_timeout(http: httpclient.InferenceServerClient) -> None:
    assert _step(http, 2, sequence_id="idle", sequence_start=True)[0] == 2
    assert _step(http, 2, sequence_id="idle")[0] == 4
    time.sleep(1.6)  # idle_timeout = "1s"
    with pytest.raises(InferenceServerException, match=r"sequence 'idle' is not live.*1s"):
        _step(http, 2, sequence_id="idle")


def test_a_model_without_sequences_refuses_sequence_parameters(
    http: httpclient.InferenceServerClient,
) -> None:
    tensor = httpclient.InferInput("INPUT", [1], "INT64")
    tensor.set_data_from_numpy(np.array([1], dtype=np.int64))
    assert http.infer(PLAIN, [tensor]).as_numpy("INPUT").tolist() == [2]
    with pytest.raises(InferenceServerException, match="has no sequence support") as error:
        http.infer(PLAIN, [tensor], sequence_id=3, sequence_start=True)
    assert PLAIN in str(error.value)


def test_control_inputs_are_hidden_from_metadata_and_config(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    for model, visible in ((ACCUMULATOR, ["INPUT"]), (GRAPH, ["INPUT"])):
        assert [t["name"] for t in http.get_model_metadata(model)["inputs"]] == visible
        assert [t["name"] for t in http.get_model_config(model)["input"]] == visible
        assert [t.name for t in grpc.get_model_metadata(model).inputs] == visible
    # Named, as Triton names them, in sequence_batching instead.
    batching = http.get_model_config(ACCUMULATOR)["sequence_batching"]
    assert batching["max_sequence_idle_microseconds"] == 1_000_000
    controls = {c["name"]: c["control"][0]["kind"] for c in batching["control_input"]}
    assert controls == {
        "START": "CONTROL_SEQUENCE_START",
        "END": "CONTROL_SEQUENCE_END",
        "READY": "CONTROL_SEQUENCE_READY",
        "CORRID": "CONTROL_SEQUENCE_CORRID",
    }
    config = grpc.get_model_config(ACCUMULATOR).config
    assert config.sequence_batching.max_sequence_idle_microseconds == 1_000_000
    assert [c.name for c in config.sequence_batching.control_input] == list(controls)
    assert "sequence_batching" not in http.get_model_config(PLAIN)


def _graph_step(
    client: httpclient.InferenceServerClient, value: int, **sequence: object
) -> tuple[int, int]:
    tensor = httpclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    result = client.infer(GRAPH, [tensor], **sequence)  # type: ignore[arg-type]
    return int(result.as_numpy("OUTPUT")[0, 0]), int(result.as_numpy("CORR")[0, 0])


def test_a_zero_code_graph_gets_its_control_inputs_filled(
    http: httpclient.InferenceServerClient,
) -> None:
    """The graph adds 100·START + 1000·END + 10000·READY to its input and echoes CORRID."""
    assert _graph_step(http, 1, sequence_id=7, sequence_start=True) == (10101, 7)
    assert _graph_step(http, 2, sequence_id=7) == (10002, 7)
    assert _graph_step(http, 3, sequence_id=7, sequence_end=True) == (11003, 7)
    with pytest.raises(InferenceServerException, match="is a string, but the correlation"):
        _graph_step(http, 1, sequence_id="seven", sequence_start=True)
    start = httpclient.InferInput("START", [1, 1], "INT32")
    start.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    value = httpclient.InferInput("INPUT", [1, 1], "INT32")
    value.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="input 'START' is filled from"):
        http.infer(GRAPH, [value, start], sequence_id=8, sequence_start=True)


def test_a_sequence_whose_replica_died_is_refused_not_moved(
    http: httpclient.InferenceServerClient, runtime: RunningRuntime
) -> None:
    assert _step(http, 1, sequence_id="doomed", sequence_start=True)[0] == 1
    with pytest.raises(InferenceServerException, match="while serving this request"):
        _step(http, -999, sequence_id="doomed")
    with pytest.raises(InferenceServerException, match=r"which is gone.*sequence_start") as error:
        _step(http, 1, sequence_id="doomed")
    assert "503" in str(error.value.status())
    assert _step(http, 1, sequence_id="doomed", sequence_start=True)[0] == 1  # begun again
    deadline = time.monotonic() + 60  # min_replicas = 2: a new replica replaces the dead one
    while (
        next(m["replicas"] for m in http.get_model_repository_index() if m["name"] == ACCUMULATOR)
        != 2
    ):
        assert time.monotonic() < deadline, "no replica replaced the one that died"
        time.sleep(0.2)


def test_a_sequence_sent_on_a_grpc_stream_without_waiting_keeps_its_order(
    grpc: grpcclient.InferenceServerClient,
) -> None:
    received: list[tuple[str, int]] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            received.append(("error", str(error)))  # type: ignore[arg-type]
        else:
            received.append((result.get_response().id, int(result.as_numpy("OUTPUT")[0])))
        if len(received) == 5:
            done.set()

    grpc.start_stream(callback=callback)
    try:
        for position, value in enumerate([1, 2, 3, 4, 5]):
            tensor = grpcclient.InferInput("INPUT", [1], "INT64")
            tensor.set_data_from_numpy(np.array([value], dtype=np.int64))
            grpc.async_stream_infer(
                ACCUMULATOR,
                [tensor],
                request_id=str(position),
                sequence_id="streamed",
                sequence_start=position == 0,
                sequence_end=position == 4,
            )
        assert done.wait(60), received
    finally:
        grpc.stop_stream()
    assert sorted(received) == [("0", 1), ("1", 3), ("2", 6), ("3", 10), ("4", 15)]
