"""Whatever a request holds or an engine returns, the runner answers: never an exception."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from omni_sdk import Engine, Tensor, TensorEngine
from omni_sdk._runners import runner_for
from omni_sdk._serving import EngineRunner


class Numbers(BaseModel):
    ints: list[int] = []
    floats: list[float] = []


class Echo(Engine):
    name = "@test/numbers"

    def infer(self, request: Numbers) -> Numbers:
        if request.ints[:1] == [1]:
            return Numbers(ints=[2**80])  # no INT64 holds it
        if request.ints[:1] == [2]:
            return Numbers.model_construct(ints=[object()])  # not even an int
        return request


class Identity(TensorEngine):
    name = "@test/identity"
    inputs = (Tensor("x", "FP16", (-1,)), Tensor("n", "UINT8", (-1,), optional=True))
    outputs = (Tensor("x", "FP16", (-1,)), Tensor("n", "UINT8", (-1,), optional=True))

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(inputs)


def _call(runner: EngineRunner, body: bytes, header_length: int = 0) -> tuple[int, Any]:
    prepared = runner.prepare_v2(body, header_length)
    outcomes = runner.run([prepared])
    status, length, parts = runner.respond(prepared, outcomes[0] if outcomes else None)
    raw = b"".join(parts)
    return status, json.loads(raw[: length or len(raw)])


def _v2(inputs: list[dict[str, Any]], binary: bool = False) -> bytes:
    return json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()


@pytest.mark.parametrize("binary", [True, False])
def test_an_int64_beyond_its_range_is_400(binary: bool) -> None:
    runner = runner_for(Echo())
    body = _v2([{"name": "ints", "datatype": "INT64", "shape": [1], "data": [2**80]}], binary)
    status, answer = _call(runner, body)
    assert status == 400
    assert "input 'ints': 1208925819614629174706176 is out of range for INT64" in answer["error"]


@pytest.mark.parametrize("binary", [True, False])
def test_an_unencodable_output_is_500_for_that_request(binary: bool) -> None:
    runner = runner_for(Echo())
    for first in (1, 2):
        body = _v2([{"name": "ints", "datatype": "INT64", "shape": [1], "data": [first]}], binary)
        status, answer = _call(runner, body)
        assert status == 500
        assert "model '@test/numbers' returned a bad response" in answer["error"]
    prepared = runner.prepare_json(b'{"ints": [2]}')
    status, _, parts = runner.respond(prepared, runner.run([prepared])[0])
    assert status == 500
    assert json.loads(b"".join(parts))["errors"][0]["code"] == 3043


def test_non_finite_floats_are_protobuf_json_strings() -> None:
    runner = runner_for(Echo())
    names = ["NaN", "Infinity", "-Infinity", 0.5]
    body = _v2([{"name": "floats", "datatype": "FP32", "shape": [4], "data": names}])
    status, answer = _call(runner, body)
    assert status == 200
    assert answer["outputs"][1]["data"] == names
    prepared = runner.prepare_json(json.dumps({"floats": names}).encode())
    _, _, parts = runner.respond(prepared, runner.run([prepared])[0])
    assert json.loads(b"".join(parts))["result"]["floats"] == names
    # Bare NaN tokens (which Python's json writes) are accepted too, and answered as strings.
    prepared = runner.prepare_json(b'{"floats": [NaN, -Infinity]}')
    _, _, parts = runner.respond(prepared, runner.run([prepared])[0])
    assert b'"floats":["NaN","-Infinity"]' in b"".join(parts)


def test_tensor_engines_read_and_write_non_finite_floats() -> None:
    runner = runner_for(Identity())
    values = ["NaN", "Infinity", "-Infinity", 70000.0]  # 70000 is beyond FP16: +inf
    status, answer = _call(
        runner, _v2([{"name": "x", "datatype": "FP16", "shape": [4], "data": values}])
    )
    assert status == 200
    assert answer["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", "Infinity"]
    decoded = np.array(answer["outputs"][0]["data"], dtype=np.float16)  # as tritonclient does
    assert math.isnan(decoded[0]) and decoded[1] == np.inf
    for bad in (["nan"], ["1.5"], [None]):
        status, answer = _call(
            runner, _v2([{"name": "x", "datatype": "FP16", "shape": [1], "data": bad}])
        )
        assert status == 400, bad


@pytest.mark.parametrize("value", [256, -1, 2**64, 2**80, 1.5])
def test_tensor_engines_check_integer_ranges(value: Any) -> None:
    runner = runner_for(Identity())
    inputs = [
        {"name": "x", "datatype": "FP16", "shape": [1], "data": [1.0]},
        {"name": "n", "datatype": "UINT8", "shape": [1], "data": [value]},
    ]
    status, answer = _call(runner, _v2(inputs))
    assert status == 400
    assert "input 'n': cannot read it as UINT8" in answer["error"]


def test_tensor_engines_refuse_shapes_over_the_limit_before_allocating() -> None:
    runner = runner_for(Identity(), max_tensor_elements=100)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP16",
                    "shape": [10**12],
                    "parameters": {"binary_data_size": 2},
                }
            ]
        }
    ).encode()
    status, answer = _call(runner, header + b"\0\0", len(header))
    assert status == 400
    assert "more than the server's limit of 100 (server.max_tensor_elements)" in answer["error"]
    prepared = runner.prepare_json(json.dumps({"x": [1.0] * 101}).encode())
    assert prepared.status == 400 and "server.max_tensor_elements" in prepared.error


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"inputs": [{"name": "ints", "datatype": "INT64", "shape": [1], "data": [1]}], '
        b'"outputs": [{"name": "nope"}]}',
        _v2([{"name": "floats", "datatype": "BYTES", "shape": [1], "data": ["x"]}]),
        _v2([{"name": "ints", "datatype": "INT64", "shape": [True], "data": [1]}]),
    ],
)
def test_undecodable_requests_are_400(body: bytes) -> None:
    for runner in (runner_for(Echo()), runner_for(Identity())):
        prepared = runner.prepare_v2(body, 0)
        assert prepared.status == 400, prepared
        assert prepared.error.startswith(f"model '{runner.model_name}'")


def test_a_decoder_bug_is_a_400_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = runner_for(Echo())

    def broken(*args: Any) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(runner, "_decode_tensor", broken)
    prepared = runner.prepare_v2(
        _v2([{"name": "ints", "datatype": "INT64", "shape": [1], "data": [1]}]), 0
    )
    assert prepared.status == 400
    assert "could not read the request: KeyError: 'surprise'" in prepared.error


def test_binary_bytes_with_a_lying_length_prefix() -> None:
    runner = runner_for(Identity())
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP16",
                    "shape": [1],
                    "parameters": {"binary_data_size": 6},
                }
            ]
        }
    ).encode()
    status, answer = _call(runner, header + struct.pack("<I", 99) + b"ab", len(header))
    assert status == 400
    assert "needs 2 bytes, got 6" in answer["error"]


def test_uint64_lists_mixing_small_and_huge_values_are_read_exactly() -> None:
    """numpy holds 0 beside 2**63 in no integer type; each value is checked on its own."""
    import numpy as np

    from omni_sdk import Tensor
    from omni_sdk._tensor_serving import _from_json
    from omni_sdk._tensors import InvalidInput

    tensor = Tensor("u", "UINT64", (-1,))
    values = [0, 15483547190988350411, 2**64 - 1]
    array = _from_json(tensor, values, np.dtype(np.uint64))
    assert array.dtype == np.uint64 and array.tolist() == values
    for bad, why in (([0, 2**64], "out of range"), ([0, 1.5, 2**63], "expected integers")):
        try:
            _from_json(tensor, bad, np.dtype(np.uint64))
        except InvalidInput as exc:
            assert why in str(exc) and "input 'u'" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
