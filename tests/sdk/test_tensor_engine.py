"""TensorEngine: v2 tensors as numpy arrays, JSON through pre/postprocess, batching."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from omni_sdk import EngineDefinitionError, InvalidInput, Tensor, TensorEngine
from omni_sdk._runners import runner_for
from omni_sdk._tensor_serving import TensorEngineRunner, v2_binary_request, v2_binary_response
from omni_sdk.discover import describe
from omni_sdk.testing import EngineCallError, EngineTester


class Doubler(TensorEngine):
    """Doubles a float matrix; counts the rows of every call."""

    name = "@test/doubler"
    inputs = (Tensor("x", "FP32", (-1, -1), pad=0),)
    outputs = (
        Tensor("y", "FP32", (-1, -1)),
        Tensor("rows", "INT64", (-1,)),
    )
    max_batch_size = 4

    def load(self, ctx: Any) -> None:
        self.calls: list[tuple[int, ...]] = []

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(x.shape)
        return {"y": x * 2, "rows": np.full(x.shape[0], x.shape[0])}


class Words(BaseModel):
    words: list[str]


class Lengths(BaseModel):
    total: int
    lengths: list[int]


class WordLengths(TensorEngine):
    """Friendly JSON on /ai/run, raw tensors on v2."""

    name = "@test/word-lengths"
    inputs = (Tensor("codes", "INT32", (-1, -1), pad=0),)
    outputs = (Tensor("lengths", "INT64", (-1,)),)
    max_batch_size = 8

    def preprocess(self, request: Words) -> dict[str, np.ndarray]:
        width = max(len(w) for w in request.words)
        codes = np.zeros((len(request.words), width), dtype=np.int32)
        for row, word in enumerate(request.words):
            codes[row, : len(word)] = [ord(c) for c in word]
        return {"codes": codes}

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"lengths": (inputs["codes"] != 0).sum(axis=1)}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Words) -> Lengths:
        lengths = outputs["lengths"].tolist()
        return Lengths(total=sum(lengths), lengths=lengths)


def test_binary_v2_round_trip_keeps_dtype_and_shape() -> None:
    with EngineTester(Doubler) as tester:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        out = tester.infer_arrays({"x": x})
        assert out["y"].dtype == np.float32
        np.testing.assert_array_equal(out["y"], x * 2)
        assert out["rows"].tolist() == [2, 2]


def test_json_v2_and_ai_run_without_preprocess() -> None:
    with EngineTester(Doubler) as tester:
        response = tester.infer_v2(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        )
        y = next(o for o in response["outputs"] if o["name"] == "y")
        assert y == {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [2.0, 4.0]}
        assert tester.run({"x": [[1.5, 2.0]]}) == {"y": [[3.0, 4.0]], "rows": [1]}


def test_wrong_datatype_shape_and_size_name_the_model_and_tensor() -> None:
    with EngineTester(Doubler) as tester:
        cases = [
            ({"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [1]}, "datatype INT64"),
            ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}, "shape [2]"),
            ({"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}, "3 elements"),
            ({"name": "z", "datatype": "FP32", "shape": [1, 1], "data": [1]}, "no input 'z'"),
        ]
        for tensor, expected in cases:
            with pytest.raises(EngineCallError) as caught:
                tester.infer_v2({"inputs": [tensor]})
            assert caught.value.status == 400
            assert "model '@test/doubler'" in str(caught.value)
            assert expected in str(caught.value)
        with pytest.raises(EngineCallError, match="input 'x': cannot read it as FP32"):
            tester.run({"x": [[1.0], [2.0, 3.0]]})
        with pytest.raises(EngineCallError, match="missing input 'x'"):
            tester.run({})


def test_binary_size_mismatch_is_a_400() -> None:
    with EngineTester(Doubler) as tester:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 2],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            }
        ).encode()
        status, _, body = tester.infer_v2_raw(header + b"\0" * 4, len(header))
        assert status == 400
        assert "needs 8 bytes, got 4" in json.loads(body)["error"]


def test_requests_that_arrive_together_share_a_call_and_are_split_back() -> None:
    engine = Doubler()
    engine.load(None)
    runner = runner_for(engine)
    assert isinstance(runner, TensorEngineRunner)
    shapes = [(1, 2), (2, 3), (1, 1), (3, 2)]
    prepared = []
    for shape in shapes:
        body, length = v2_binary_request({"x": np.ones(shape, dtype=np.float32)})
        prepared.append(runner.prepare_v2(body, length))
    outcomes = runner.run(prepared)
    # 1 + 2 + 1 rows fit max_batch_size=4, padded to 3 columns; the 3-row request goes alone.
    assert engine.calls == [(4, 3), (3, 2)]
    for shape, outcome in zip(shapes, outcomes, strict=True):
        assert outcome["y"].shape[0] == shape[0]
    status, length, parts = runner.respond(prepared[1], outcomes[1])
    assert status == 200
    y = v2_binary_response(b"".join(parts), length)["y"]
    np.testing.assert_array_equal(y, np.full((2, 3), 2.0, dtype=np.float32))


def test_preprocess_and_postprocess_give_friendly_json() -> None:
    with EngineTester(WordLengths) as tester:
        assert tester.run({"words": ["a", "abc"]}) == {"total": 4, "lengths": [1, 3]}
        with pytest.raises(EngineCallError, match="input 'words'"):
            tester.run({"words": "nope"})
        codes = np.array([[104, 105, 0]], dtype=np.int32)
        assert tester.infer_arrays({"codes": codes})["lengths"].tolist() == [2]


def test_json_and_v2_requests_batch_together() -> None:
    engine = WordLengths()
    runner = runner_for(engine)
    json_request = runner.prepare_json(json.dumps({"words": ["abcd"]}).encode())
    body, length = v2_binary_request({"codes": np.array([[1, 1, 0]], dtype=np.int32)})
    v2_request = runner.prepare_v2(body, length)
    outcomes = runner.run([json_request, v2_request])
    assert outcomes[0] == Lengths(total=4, lengths=[4])
    assert outcomes[1]["lengths"].tolist() == [2]


def test_errors_in_the_model_are_500s_that_name_it() -> None:
    class Broken(Doubler):
        name = "@test/broken"

        def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": inputs["x"][:, :1].reshape(-1)}

    with EngineTester(Broken) as tester, pytest.raises(EngineCallError) as caught:
        tester.run({"x": [[1.0]]})
    assert caught.value.status == 500
    assert "model '@test/broken'" in str(caught.value)
    assert "output 'y' has shape [1], expected [-1, -1]" in str(caught.value)


def test_preprocess_can_reject_input_with_a_400() -> None:
    class Picky(WordLengths):
        name = "@test/picky"

        def preprocess(self, request: Words) -> dict[str, np.ndarray]:
            if not request.words:
                raise InvalidInput("input 'words' is empty")
            return super().preprocess(request)

    with EngineTester(Picky) as tester, pytest.raises(EngineCallError) as caught:
        tester.run({"words": []})
    assert caught.value.status == 400
    assert "model '@test/picky': input 'words' is empty" in str(caught.value)


def test_describe_reports_v2_tensors_and_json_schemas() -> None:
    described = describe(Doubler)
    assert described["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, -1], "optional": False}
    ]
    assert [o["name"] for o in described["outputs"]] == ["y", "rows"]
    schema = described["input_schema"]
    assert schema["required"] == ["x"]
    assert schema["properties"]["x"]["type"] == "array"
    friendly = describe(WordLengths)
    assert friendly["input_schema"]["properties"]["words"]["type"] == "array"
    assert friendly["output_schema"]["title"] == "Lengths"
    assert friendly["inputs"][0]["name"] == "codes"


def test_definition_errors() -> None:
    class NoInfer(TensorEngine):
        name = "@test/no-infer"
        inputs = (Tensor("x", "FP32", (-1,)),)
        outputs = (Tensor("y", "FP32", (-1,)),)

    with pytest.raises(EngineDefinitionError, match="must implement infer_tensors"):
        NoInfer.validate_definition()

    class FixedBatch(Doubler):
        name = "@test/fixed"
        inputs = (Tensor("x", "FP32", (1, 3)),)

    with pytest.raises(EngineDefinitionError, match="tensor 'x' has shape \\[1, 3\\]"):
        FixedBatch.validate_definition()
    with pytest.raises(EngineDefinitionError, match="not a v2 datatype"):
        Tensor("x", "FLOAT", [1])


def test_plain_engines_do_not_import_numpy() -> None:
    code = "import sys, omni_sdk, omni_sdk._runners, omni_sdk.worker; print('numpy' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
