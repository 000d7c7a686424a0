"""KServe v2 tensors over gRPC: a ``ModelInferRequest`` as the v2 body the HTTP route would
have received (a JSON header, then the raw tensors of the binary-tensor extension), and the
worker's v2 answer as a ``ModelInferResponse`` with ``raw_output_contents``."""

from __future__ import annotations

import array
import json
import struct
import sys
from json.encoder import encode_basestring_ascii as _string
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from omni_runtime.discovery import ModelSpec

__all__ = ["RequestError", "config_tensor", "infer_body", "infer_response", "tensor_bytes"]

# Typed contents fields, by v2 datatype, and the ``array`` type code their values take (the
# binary tensor extension is little-endian: a big-endian host swaps them).
_CONTENTS = {
    "BOOL": ("bool_contents", "B"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "UINT8": ("uint_contents", "B"),
    "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"),
    "UINT64": ("uint64_contents", "Q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
}
_NUMPY = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
_SWAP = sys.byteorder == "big"
_LENGTH = struct.Struct("<I")
_ANSWER_HEADERS: dict[bytes, dict[str, Any]] = {}  # a worker's answer header, parsed


class RequestError(Exception):
    """A request that cannot be turned into a v2 body: INVALID_ARGUMENT, naming the field."""


def _bytes_of(datatype: str, contents: Any, name: str) -> bytes:
    """Typed contents as the raw bytes of the binary tensor extension."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(v)) + v for v in contents.bytes_contents)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise RequestError(
            f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents"
        )
    source = getattr(contents, field[0])
    try:
        values = array.array(field[1], source)
    except OverflowError:
        for value in source:  # name the value, as the HTTP route does
            try:
                array.array(field[1], [value])
            except OverflowError:
                raise RequestError(
                    f"input '{name}': {value} is out of range for {datatype}"
                ) from None
        raise
    if _SWAP:
        values.byteswap()
    return values.tobytes()


def config_tensor(t: dict[str, Any], cls: Any, spec: ModelSpec) -> Any:
    """A tensor of ``spec`` as ``ModelConfig`` shows it (``cls``: ModelInput, ModelOutput);
    without the batch dimension where dimension 0 is the batch, as Triton shows it."""
    datatype = "STRING" if t["datatype"] == "BYTES" else t["datatype"]
    return cls(
        name=t["name"],
        data_type=model_config_pb2.DataType.Value(f"TYPE_{datatype}"),
        dims=t["shape"][1:] if spec.batch_dimension else t["shape"],
    )


def tensor_bytes(tensor: Any) -> bytes:
    """An input's typed contents as the raw bytes of the binary tensor extension."""
    return _bytes_of(tensor.datatype, tensor.contents, tensor.name)


def infer_body(request: Any) -> tuple[bytes, int]:
    """A ``ModelInferRequest`` as a v2 binary-extension body and its JSON header's length."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send every input raw or none"
        )
    # The header is written out rather than built and dumped: on every call, it costs a
    # third of what ``json.dumps`` does. Strings go through json's own escaping.
    inputs, chunks = [], []
    for index, tensor in enumerate(request.inputs):
        data = raw[index] if raw else _bytes_of(tensor.datatype, tensor.contents, tensor.name)
        inputs.append(
            f'{{"name":{_string(tensor.name)},"datatype":{_string(tensor.datatype)},'
            f'"shape":[{",".join(map(str, tensor.shape))}],'
            f'"parameters":{{"binary_data_size":{len(data)}}}}}'
        )
        chunks.append(data)
    header = f'{{"inputs":[{",".join(inputs)}]'
    if request.id:
        header += f',"id":{_string(request.id)}'
    if request.outputs:
        outputs = ",".join(
            f'{{"name":{_string(o.name)},"parameters":{{"binary_data":true}}}}'
            for o in request.outputs
        )
        header += f',"outputs":[{outputs}]'
    # The request's own parameters (sequence_id, ...) as the HTTP route would see them.
    if request.parameters:
        parameters = _parameters(request.parameters)
        if not request.outputs:
            parameters["binary_data_output"] = True
        header += f',"parameters":{json.dumps(parameters)}'
    elif not request.outputs:
        header += ',"parameters":{"binary_data_output":true}'
    encoded = (header + "}").encode()
    return encoded + b"".join(chunks), len(encoded)


def _parameters(parameters: Any) -> dict[str, Any]:
    """``InferParameter`` values by name, as JSON values."""
    values = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, which) if which else None
    return values


def infer_response(
    model: str, request_id: str, body: bytes, header_length: int, version: str = "1"
) -> Any:
    """The worker's v2 answer as a ``ModelInferResponse`` with ``raw_output_contents``."""
    header = _answer_header(body[:header_length] if header_length else body)
    response = service_pb2.ModelInferResponse(
        model_name=model, model_version=version, id=header.get("id", request_id)
    )
    offset = header_length
    for output in header.get("outputs", []):
        tensor = response.outputs.add(
            name=output["name"], datatype=output["datatype"], shape=output["shape"]
        )
        parameters = output.get("parameters") or {}
        size = parameters.get("binary_data_size")
        if "shared_memory_region" in parameters:  # written into a region: no data here
            for key, value in parameters.items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
        if size is not None:
            response.raw_output_contents.append(body[offset : offset + size])
            offset += size
        else:
            response.raw_output_contents.append(_raw_of(output, tensor.datatype))
    return response


def _answer_header(head: bytes) -> dict[str, Any]:
    """A worker's answer header, parsed (kept, read-only, while a model answers alike)."""
    header = _ANSWER_HEADERS.get(head)
    if header is None:
        header = json.loads(head)
        if len(head) <= 1024:
            if len(_ANSWER_HEADERS) >= 64:
                _ANSWER_HEADERS.clear()
            _ANSWER_HEADERS[head] = header
    return header


def _raw_of(output: dict[str, Any], datatype: str) -> bytes:
    """JSON ``data`` of an output as raw bytes (a worker that answered without binary data)."""
    data = output.get("data", [])
    if datatype == "BYTES":
        values = [_element_bytes(v) for v in np.ravel(np.array(data, dtype=object))]
        return b"".join(_LENGTH.pack(len(v)) + v for v in values)
    return np.asarray(data, dtype=_NUMPY.get(datatype, np.float32)).tobytes()


def _element_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode()
