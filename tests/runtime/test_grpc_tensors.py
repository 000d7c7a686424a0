"""A ``ModelInferRequest`` as the v2 binary-extension body the worker takes
(``server/grpc_tensors.py``): the JSON header is the one the HTTP route would have received,
typed contents become the raw little-endian bytes of their datatype, and bad contents are
refused naming the input and the value."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from omni_runtime.server.grpc_tensors import RequestError, infer_body, infer_response

TYPED = [
    ("BOOL", "bool_contents", [True, False, True], np.bool_),
    ("INT8", "int_contents", [-128, 0, 127], np.int8),
    ("INT16", "int_contents", [-32768, 5, 32767], np.int16),
    ("INT32", "int_contents", [-(2**31), 7, 2**31 - 1], np.int32),
    ("INT64", "int64_contents", [-(2**63), 9, 2**63 - 1], np.int64),
    ("UINT8", "uint_contents", [0, 1, 255], np.uint8),
    ("UINT16", "uint_contents", [0, 1, 65535], np.uint16),
    ("UINT32", "uint_contents", [0, 1, 2**32 - 1], np.uint32),
    ("UINT64", "uint64_contents", [0, 1, 2**64 - 1], np.uint64),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0], np.float32),
    ("FP64", "fp64_contents", [0.1, -2.5, 1e300], np.float64),
]


def _split(body: bytes, header_length: int) -> tuple[dict[str, Any], bytes]:
    return json.loads(body[:header_length]), body[header_length:]


@pytest.mark.parametrize(("datatype", "field", "values", "dtype"), TYPED)
def test_typed_contents_become_the_raw_bytes_of_their_datatype(
    datatype: str, field: str, values: list[Any], dtype: Any
) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, len(values)])
    getattr(tensor.contents, field).extend(values)
    header, data = _split(*infer_body(request))
    assert header == {
        "inputs": [
            {
                "name": "x",
                "datatype": datatype,
                "shape": [1, len(values)],
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    assert data == np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def test_the_header_carries_id_outputs_parameters_and_escaped_names() -> None:
    request = service_pb2.ModelInferRequest(model_name="m", id='ïd "1"\n')
    words = request.inputs.add(name='té"xt', datatype="BYTES", shape=[2])
    words.contents.bytes_contents.extend([b"ab", b""])
    request.inputs.add(name="raw", datatype="FP16", shape=[1])
    request.raw_input_contents.extend([b"\x02\x00\x00\x00ab\x00\x00\x00\x00", b"\x00\x3c"])
    request.outputs.add(name="out\\put")
    request.parameters["sequence_id"].int64_param = 7
    request.parameters["sequence_start"].bool_param = True
    header, data = _split(*infer_body(request))
    assert header == {
        "id": 'ïd "1"\n',
        "inputs": [
            {"name": 'té"xt', "datatype": "BYTES", "shape": [2],
             "parameters": {"binary_data_size": 10}},
            {"name": "raw", "datatype": "FP16", "shape": [1],
             "parameters": {"binary_data_size": 2}},
        ],
        "outputs": [{"name": "out\\put", "parameters": {"binary_data": True}}],
        "parameters": {"sequence_id": 7, "sequence_start": True},
    }  # fmt: skip
    assert data == b"\x02\x00\x00\x00ab\x00\x00\x00\x00" + b"\x00\x3c"


@pytest.mark.parametrize(
    ("datatype", "field", "bad"),
    [("INT8", "int_contents", 128), ("UINT8", "uint_contents", 256),
     ("INT16", "int_contents", -32769)],
)  # fmt: skip
def test_a_value_out_of_range_is_refused_naming_input_and_value(
    datatype: str, field: str, bad: int
) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="ints", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend([1, bad])
    with pytest.raises(RequestError, match=rf"input 'ints': {bad} is out of range for {datatype}"):
        infer_body(request)


def test_raw_contents_for_some_inputs_only_are_refused() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00\x00\x00\x3f")
    with pytest.raises(RequestError, match="1 entries for 2 inputs"):
        infer_body(request)


def test_answers_alike_and_different_are_each_read_as_they_are() -> None:
    def answer(name: str, shape: list[int], data: bytes) -> tuple[bytes, int]:
        output = {"name": name, "datatype": "UINT8", "shape": shape,
                  "parameters": {"binary_data_size": len(data)}}  # fmt: skip
        header = json.dumps({"outputs": [output]})
        return header.encode() + data, len(header)

    for name, shape, data in [("a", [2], b"\x01\x02"), ("a", [2], b"\x03\x04"),
                              ("b", [1], b"\x05"), ("a", [2], b"\x06\x07")]:  # fmt: skip
        response = infer_response("m", "r1", *answer(name, shape, data), version="3")
        assert (response.model_name, response.model_version, response.id) == ("m", "3", "r1")
        assert [(o.name, list(o.shape)) for o in response.outputs] == [(name, shape)]
        assert list(response.raw_output_contents) == [data]
