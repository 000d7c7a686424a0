"""KServe v2 tensors over gRPC: a ``ModelInferRequest`` as the v2 body the HTTP route would
have received (a JSON header, then the raw tensors of the binary-tensor extension), and the
worker's v2 answer as a ``ModelInferResponse`` with ``raw_output_contents``."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from omni_runtime.discovery import ModelSpec

__all__ = ["RequestError", "config_tensor", "infer_body", "infer_response", "tensor_bytes"]

# Typed contents fields, by v2 datatype, and the numpy type their values take.
_CONTENTS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
_NUMPY = {**{k: v[1] for k, v in _CONTENTS.items()}, "FP16": np.float16}
_LENGTH = struct.Struct("<I")


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
    return np.asarray(list(getattr(contents, field[0])), dtype=field[1]).tobytes()


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
    inputs, chunks = [], []
    for index, tensor in enumerate(request.inputs):
        data = raw[index] if raw else _bytes_of(tensor.datatype, tensor.contents, tensor.name)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        chunks.append(data)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    # The request's own parameters (sequence_id, ...) as the HTTP route would see them.
    parameters = _parameters(request.parameters) if request.parameters else {}
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
        ]
    else:
        parameters["binary_data_output"] = True
    if parameters:
        header["parameters"] = parameters
    encoded = json.dumps(header).encode()
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
    header = json.loads(body[:header_length] if header_length else body)
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
