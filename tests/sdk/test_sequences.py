"""Sequence parameters (``omni_sdk.sequences``) and the control inputs a runner fills from them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from omni_sdk import Engine, Tensor, TensorEngine
from omni_sdk._runners import runner_for
from omni_sdk.sequences import SequenceControls, SequenceError, control_values, read_sequence
from omni_sdk.testing import EngineCallError, EngineTester


class Step(BaseModel):
    value: int
    START: bool = False
    END: int = 0
    CORRID: str = ""
    FLAGS: list[float] = []


class Stateful(Engine):
    name = "@test/stateful"

    def infer(self, request: Step) -> Step:
        return request


class Graph(TensorEngine):
    name = "@test/graph"
    inputs = (
        Tensor("x", "FP32", (-1, 2)),
        Tensor("START", "INT32", (-1, 1)),
        Tensor("CORRID", "UINT64", (-1, 1)),
        Tensor("READY", "BOOL", (1,)),
    )
    outputs = (Tensor("x", "FP32", (-1, 2)),)

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": inputs["x"]}


def _v2(parameters: dict[str, Any] | None, inputs: list[dict[str, Any]]) -> bytes:
    header: dict[str, Any] = {"inputs": inputs}
    if parameters is not None:
        header["parameters"] = parameters
    return json.dumps(header).encode()


VALUE = [{"name": "value", "datatype": "INT64", "shape": [1], "data": [3]}]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (None, None),
        ({"binary_data_output": True}, None),
        ({"sequence_id": 0}, None),
        ({"sequence_id": ""}, None),
        ({"sequence_id": 5}, (5, False, False)),
        ({"sequence_id": "a", "sequence_start": True, "sequence_end": True}, ("a", True, True)),
    ],
)
def test_read_sequence(parameters: Any, expected: Any) -> None:
    assert read_sequence(parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"sequence_id": 1, "sequence_start": 1}, "'sequence_start' must be true or false"),
        ({"sequence_id": True}, "'sequence_id' must be an integer or a string"),
        ({"sequence_id": 1.5}, "'sequence_id' must be an integer or a string"),
        ({"sequence_id": -3}, "from 1 to 2\\*\\*64-1"),
        ({"sequence_id": 1 << 64}, "from 1 to 2\\*\\*64-1"),
        ({"sequence_id": "x" * 257}, "257 characters long"),
        ({"sequence_start": True}, "need a 'sequence_id'"),
    ],
)
def test_malformed_sequence_parameters_name_the_parameter(parameters: Any, message: str) -> None:
    with pytest.raises(SequenceError, match=message):
        read_sequence(parameters)


def test_control_values() -> None:
    controls = SequenceControls(start="S", end="E", ready="R", correlation_id="C")
    assert control_values(controls, "q", True, False) == {"S": 1, "E": 0, "R": 1, "C": "q"}
    assert controls.inputs() == {"S": "start", "E": "end", "R": "ready", "C": "correlation_id"}


def test_a_pydantic_engine_gets_its_control_fields_filled() -> None:
    runner = runner_for(Stateful())
    runner.use_sequences(
        SequenceControls(start="START", end="END", ready="FLAGS", correlation_id="CORRID")
    )
    body = _v2({"sequence_id": 9, "sequence_start": True}, VALUE)
    prepared = runner.prepare_v2(body, 0)
    assert prepared.request == Step(value=3, START=True, END=0, CORRID="9", FLAGS=[1.0])
    sent = [*VALUE, {"name": "END", "datatype": "INT64", "shape": [1], "data": [1]}]
    refused = runner.prepare_v2(_v2({"sequence_id": 9}, sent), 0)
    assert refused.status == 400 and "input 'END' is filled from" in refused.error
    missing = runner.prepare_v2(_v2(None, VALUE), 0)
    assert missing.status == 400 and "needs the parameter 'sequence_id'" in missing.error


def test_a_model_without_sequences_refuses_sequence_parameters() -> None:
    runner = runner_for(Stateful())
    assert runner.prepare_v2(_v2({"sequence_id": 0}, VALUE), 0).request is not None
    refused = runner.prepare_v2(_v2({"sequence_id": 4}, VALUE), 0)
    assert refused.status == 400 and "'@test/stateful': has no sequence support" in refused.error


def test_a_tensor_engine_gets_one_batch_row_of_each_control_input() -> None:
    runner = runner_for(Graph())
    runner.use_sequences(SequenceControls(start="START", correlation_id="CORRID", ready="READY"))
    x = [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]
    prepared = runner.prepare_v2(_v2({"sequence_id": 12, "sequence_end": True}, x), 0)
    assert prepared.tensors is not None
    start, corrid, ready = (prepared.tensors[n] for n in ("START", "CORRID", "READY"))
    assert start.dtype == np.int32 and start.tolist() == [[0]]
    assert corrid.dtype == np.uint64 and corrid.tolist() == [[12]]
    assert ready.dtype == np.bool_ and ready.tolist() == [True]
    refused = runner.prepare_v2(_v2({"sequence_id": "text", "sequence_start": True}, x), 0)
    assert refused.status == 400 and "is a string, but the correlation input" in refused.error


@pytest.mark.parametrize(
    ("controls", "message"),
    [
        (SequenceControls(start="NOPE"), "sequence.start names the input 'NOPE'"),
        (SequenceControls(correlation_id="READY"), "must be an integer or BYTES tensor"),
        (SequenceControls(end="x"), None),
    ],
)
def test_controls_must_name_inputs_that_can_hold_them(
    controls: SequenceControls, message: str | None
) -> None:
    runner = runner_for(Graph())
    if message is None:
        runner.use_sequences(controls)  # an FP32 input holds 1.0 and 0.0
        return
    with pytest.raises(ValueError, match=message):
        runner.use_sequences(controls)


def test_engine_tester_fills_the_control_inputs_as_the_worker_does() -> None:
    controls = SequenceControls(start="START", correlation_id="CORRID")
    with EngineTester(Stateful, sequence=controls) as tester:
        request = {"inputs": VALUE, "parameters": {"sequence_id": "s", "sequence_start": True}}
        outputs = {o["name"]: o["data"] for o in tester.infer_v2(request)["outputs"]}
        assert outputs["START"] == [True] and outputs["CORRID"] == ["s"]
        with pytest.raises(EngineCallError, match="needs the parameter 'sequence_id'"):
            tester.infer_v2({"inputs": VALUE})
