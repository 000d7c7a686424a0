"""Serving a ``TensorEngine``: v2 tensors ↔ numpy arrays, and batching along dimension 0.

Binary v2 inputs become arrays with ``np.frombuffer`` (no Python lists in between) and
output arrays go out with ``tobytes``; JSON data is converted with ``np.asarray``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from omni_sdk._engine import Engine
from omni_sdk._serving import EngineRunner, Prepared
from omni_sdk._serving import describe_validation_error as _describe
from omni_sdk._tensor_engine import DATATYPES, Tensor, TensorEngine
from omni_sdk._tensors import (
    DEFAULT_MAX_TENSOR_ELEMENTS,
    FLOAT_NAMES,
    INT_RANGES,
    InvalidInput,
    decode_bytes_tensor,
    element_count,
    encode_bytes_tensor,
)
from omni_sdk.envelopes import RESULT_CLOSE, RESULT_OPEN, dump_json
from omni_sdk.sequences import SequenceId

__all__ = [
    "TensorEngineRunner",
    "array_from_v2",
    "check_array",
    "encode_array",
    "v2_binary_request",
    "v2_binary_response",
]

Arrays = dict[str, NDArray[Any]]


def _dtype(datatype: str) -> np.dtype[Any]:
    return np.dtype(DATATYPES[datatype])


def _shape_ok(tensor: Tensor, shape: Sequence[int]) -> bool:
    return len(shape) == len(tensor.shape) and all(
        want in (-1, got) for want, got in zip(tensor.shape, shape, strict=True)
    )


def _shape_error(tensor: Tensor, shape: Sequence[int], role: str = "input") -> InvalidInput:
    return InvalidInput(
        f"{role} '{tensor.name}' has shape {list(shape)}, expected {list(tensor.shape)} "
        "(-1: any size)"
    )


def array_from_v2(
    tensor: Tensor,
    datatype: Any,
    shape: Any,
    data: Any,
    raw: memoryview | None,
    max_elements: int | None = None,
) -> NDArray[Any]:
    """One v2 input (binary or JSON ``data``) → an array, checking datatype and shape."""
    name = tensor.name
    if datatype != tensor.datatype:
        raise InvalidInput(f"input '{name}' has datatype {datatype}, expected {tensor.datatype}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if not _shape_ok(tensor, shape):
        raise _shape_error(tensor, shape)
    count = element_count(name, shape, max_elements)
    dtype = _dtype(datatype)
    if raw is not None:
        if datatype == "BYTES":
            items = decode_bytes_tensor(raw, name)
            if len(items) != count:
                raise InvalidInput(
                    f"input '{name}': shape {shape} holds {count} elements, got {len(items)}"
                )
            array = np.empty(count, dtype=object)
            array[:] = items
        else:
            if len(raw) != count * dtype.itemsize:
                raise InvalidInput(
                    f"input '{name}': shape {shape} of {datatype} needs "
                    f"{count * dtype.itemsize} bytes, got {len(raw)}"
                )
            array = np.frombuffer(raw, dtype=dtype)
        return array.reshape(shape)
    if data is None:
        raise InvalidInput(f"input '{name}' has neither 'data' nor binary data")
    array = _from_json(tensor, data, dtype)
    if array.size != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} holds {count} elements, got {array.size}"
        )
    return array.reshape(shape)


def _from_json(tensor: Tensor, data: Any, dtype: np.dtype[Any]) -> NDArray[Any]:
    try:
        if tensor.datatype == "BYTES":
            array = np.array(data, dtype=object)
            flat = array.reshape(-1)
            for index, item in enumerate(flat):
                if isinstance(item, str):
                    flat[index] = item.encode()
                elif not isinstance(item, bytes):
                    raise InvalidInput(
                        f"input '{tensor.name}': BYTES elements must be strings, "
                        f"got {type(item).__name__}"
                    )
            return array
        array = np.asarray(data)
        if dtype.kind == "f" and array.dtype.kind in "OU":
            array = np.asarray(_read_float_names(data))
        if dtype.kind in "iu" and array.dtype.kind in "fO":
            # Floats, or integers numpy holds in no one type (0 beside 2**63): one by one.
            low, high = INT_RANGES[tensor.datatype]
            for value in np.array(data, dtype=object).reshape(-1):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"expected integers from {low} to {high}")
                if not low <= value <= high:
                    raise ValueError(f"{value} is out of range ({low} to {high})")
            return np.array(data, dtype=dtype)
        if array.dtype == object or array.dtype.kind in "USV":
            raise ValueError("not a rectangular array of numbers")
        if tensor.datatype == "BOOL" and array.dtype.kind != "b":
            raise ValueError("expected true or false")
        if dtype.kind in "iu" and array.size:
            low, high = INT_RANGES[tensor.datatype]
            for value in (array.min(), array.max()):
                if not low <= value <= high:
                    raise ValueError(f"{value} is out of range ({low} to {high})")
        if dtype.kind == "f" and array.dtype != dtype:
            with np.errstate(over="ignore"):  # beyond FP16/FP32: ±inf, as a cast does
                return array.astype(dtype)
        return array.astype(dtype, copy=False)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"input '{tensor.name}': cannot read it as {tensor.datatype} {list(tensor.shape)}: "
            f"{exc}"
        ) from None


def _read_float_names(data: Any) -> Any:
    """Nested JSON data with "NaN", "Infinity" and "-Infinity" read as floats."""
    if isinstance(data, list):
        return [_read_float_names(item) for item in data]
    if isinstance(data, str):
        if data not in FLOAT_NAMES:
            raise ValueError(
                f"{data!r} is not a number (strings allowed: NaN, Infinity, -Infinity)"
            )
        return FLOAT_NAMES[data]
    return data


def check_array(tensor: Tensor, value: Any, role: str) -> NDArray[Any]:
    """An array an engine produced (or preprocess made) → the declared datatype, shape checked."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if not _shape_ok(tensor, array.shape):
        raise ValueError(str(_shape_error(tensor, array.shape, role)))
    dtype = _dtype(tensor.datatype)
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array


def encode_array(array: NDArray[Any], datatype: str, binary: bool) -> tuple[list[Any], bytes]:
    """An output array → (JSON data, b"") or ([], its binary v2 encoding)."""
    if datatype == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]
        if binary:
            return [], encode_bytes_tensor(items)
        return [x.decode(errors="replace") for x in items], b""
    if binary:
        return [], np.ascontiguousarray(array, dtype=_dtype(datatype)).tobytes()
    return array.reshape(-1).tolist(), b""


class TensorEngineRunner(EngineRunner):
    """The runner of a ``TensorEngine`` (``runner_for(engine)`` picks it)."""

    engine: TensorEngine

    def __init__(
        self,
        engine: Engine,
        model_name: str | None = None,
        max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
    ) -> None:
        assert isinstance(engine, TensorEngine)
        self.engine = engine
        cls = type(engine)
        self.model_name = model_name or cls.name
        self.max_tensor_elements = max_tensor_elements
        self._label = f"model '{self.model_name}'"
        # After load: what the model really has (read from its file or its server).
        self.tensor_inputs = {t.name: t for t in engine.inputs}
        self.tensor_outputs = {t.name: t for t in engine.outputs}
        if not self.tensor_inputs or not self.tensor_outputs:
            raise TypeError(
                f"{self._label} declares no input or no output tensors: set `inputs` and "
                "`outputs` (or have load read them from the model)"
            )
        self.inputs = {name: t.spec() for name, t in self.tensor_inputs.items()}
        self.outputs = {name: t.spec() for name, t in self.tensor_outputs.items()}
        self.preprocessed = cls.has_preprocess()
        self.postprocessed = cls.has_postprocess()
        signature = cls.signature()
        self.request_model = signature.request_model
        self.response_model = signature.response_model
        self.batch_size = cls.max_batch_size if cls.max_batch_size > 1 else 1
        self.is_async = False

    # -- decoding ------------------------------------------------------------------------

    def _decode_tensor(
        self, spec: Any, datatype: Any, shape: Any, data: Any, raw: memoryview | None
    ) -> Any:
        tensor = self.tensor_inputs[spec.name]
        return array_from_v2(tensor, datatype, shape, data, raw, self.max_tensor_elements)

    def _control_value(self, spec: Any, value: SequenceId) -> NDArray[Any]:
        """A control input as an array of its declared datatype: one batch row (each
        dimension of any size is 1), as Triton's sequence batcher fills it."""
        tensor = self.tensor_inputs[spec.name]
        scalar = super()._control_value(dataclasses.replace(spec, rank=0), value)
        shape = tuple(d if d > 0 else 1 for d in tensor.shape)
        if tensor.datatype == "BYTES":
            array = np.empty(shape, dtype=object)
            array.fill(str(scalar).encode())
            return array
        return np.full(shape, scalar, dtype=_dtype(tensor.datatype))

    def _validate(self, v2: bool, values: dict[str, Any]) -> Prepared:
        if v2:
            return Prepared(v2=True, tensors=values)
        if self.preprocessed:
            try:
                return Prepared(v2=False, request=self.request_model.model_validate(values))
            except ValidationError as exc:
                return self._bad(False, f"{self._label}: {_describe(exc, 'input')}")
        try:
            return Prepared(v2=False, tensors=self._json_tensors(values))
        except InvalidInput as exc:
            return self._bad(False, f"{self._label}: {exc}")

    def _json_tensors(self, values: dict[str, Any]) -> Arrays:
        unknown = [name for name in values if name not in self.tensor_inputs]
        if unknown:
            known = ", ".join(self.tensor_inputs)
            raise InvalidInput(f"has no input '{unknown[0]}' (its inputs: {known})")
        arrays: Arrays = {}
        for name, tensor in self.tensor_inputs.items():
            if name not in values or values[name] is None:
                if tensor.optional:
                    continue
                raise InvalidInput(f"missing input '{name}'")
            array = _from_json(tensor, values[name], _dtype(tensor.datatype))
            if not _shape_ok(tensor, array.shape):
                raise _shape_error(tensor, array.shape)
            element_count(name, list(array.shape), self.max_tensor_elements)
            arrays[name] = array
        return arrays

    # -- running -------------------------------------------------------------------------

    def run(self, batch: list[Prepared]) -> list[Any]:
        """Outcomes for the valid requests: output arrays, a response model, or an exception."""
        valid = [p for p in batch if p.valid]
        outcomes: list[Any] = [None] * len(valid)
        jobs: list[tuple[int, Arrays]] = []
        for index, prepared in enumerate(valid):
            try:
                jobs.append((index, self._inputs_of(prepared)))
            except Exception as exc:
                outcomes[index] = exc
        for group in self._groups(jobs):
            results: list[Any]
            try:
                results = self._infer_group([arrays for _, arrays in group])
            except Exception as exc:
                results = [exc] * len(group)
            for (index, _), result in zip(group, results, strict=True):
                outcomes[index] = result
        if self.postprocessed:
            for index, prepared in enumerate(valid):
                outcome = outcomes[index]
                if prepared.v2 or isinstance(outcome, BaseException):
                    continue
                try:
                    outcomes[index] = self.engine.postprocess(outcome, prepared.request)
                except Exception as exc:
                    outcomes[index] = exc
        return outcomes

    async def arun(self, batch: list[Prepared]) -> list[Any]:
        return self.run(batch)

    def _inputs_of(self, prepared: Prepared) -> Arrays:
        if prepared.tensors is not None:
            return prepared.tensors
        made = self.engine.preprocess(prepared.request)
        if not isinstance(made, dict):
            raise TypeError(f"preprocess returned {type(made).__name__}, expected a dict")
        arrays: Arrays = {}
        for name, tensor in self.tensor_inputs.items():
            if name in made:
                arrays[name] = check_array(tensor, made[name], "preprocess output")
            elif not tensor.optional:
                raise TypeError(f"preprocess returned no input '{name}'")
        return arrays

    def _rows(self, arrays: Arrays) -> int:
        rows = {name: a.shape[0] if a.ndim else 1 for name, a in arrays.items()}
        if len(set(rows.values())) > 1:
            detail = ", ".join(f"'{n}' {r}" for n, r in rows.items())
            raise InvalidInput(f"inputs disagree on the batch size (dimension 0): {detail}")
        return next(iter(rows.values()), 0)

    def _groups(self, jobs: list[tuple[int, Arrays]]) -> list[list[tuple[int, Arrays]]]:
        """Requests that can share one ``infer_tensors`` call, in arrival order."""
        if self.batch_size <= 1:
            return [[job] for job in jobs]
        groups: list[list[tuple[int, Arrays]]] = []
        open_groups: dict[tuple[Any, ...], tuple[list[tuple[int, Arrays]], list[int]]] = {}
        for job in jobs:
            arrays = job[1]
            try:
                rows = self._rows(arrays)
            except InvalidInput:
                groups.append([job])  # fails on its own, with the message
                continue
            key = tuple(
                (name, a.ndim if self.tensor_inputs[name].pad is not None else a.shape[1:])
                for name, a in sorted(arrays.items())
            )
            group, size = open_groups.get(key, (None, [0]))
            if group is None or size[0] + rows > self.batch_size:
                group, size = [], [0]
                groups.append(group)
                open_groups[key] = (group, size)
            group.append(job)
            size[0] += rows
        return groups

    def _infer_group(self, group: list[Arrays]) -> list[Arrays]:
        rows = [self._rows(arrays) for arrays in group]
        if len(group) == 1:
            merged = group[0]
        else:
            merged = {
                name: _join([arrays[name] for arrays in group], self.tensor_inputs[name].pad)
                for name in group[0]
            }
        produced = self.engine.infer_tensors(merged)
        if not isinstance(produced, dict):
            raise TypeError(f"infer_tensors returned {type(produced).__name__}, expected a dict")
        total = sum(rows)
        outputs: Arrays = {}
        for name, tensor in self.tensor_outputs.items():
            if name not in produced:
                if tensor.optional:
                    continue
                raise TypeError(f"infer_tensors returned no output '{name}'")
            array = check_array(tensor, produced[name], "output")
            if len(group) > 1 and (array.ndim == 0 or array.shape[0] != total):
                raise TypeError(
                    f"output '{name}' has shape {list(array.shape)} for a batch of {total} rows"
                )
            outputs[name] = array
        if len(group) == 1:
            return [outputs]
        results: list[Arrays] = []
        start = 0
        for count in rows:
            results.append({name: a[start : start + count] for name, a in outputs.items()})
            start += count
        return results

    # -- encoding ------------------------------------------------------------------------

    def respond_all(
        self, batch: list[Prepared], outcomes: list[Any]
    ) -> list[tuple[int, int, list[bytes]]]:
        results = iter(outcomes)
        return [self.respond(p, next(results) if p.valid else None) for p in batch]

    def respond(self, prepared: Prepared, outcome: Any) -> tuple[int, int, list[bytes]]:
        if not prepared.valid:
            return self._error(prepared.v2, prepared.status, prepared.error)
        if isinstance(outcome, InvalidInput):
            return self._error(prepared.v2, 400, f"{self._label}: {outcome}")
        if isinstance(outcome, BaseException):
            message = f"{self._label} failed: {type(outcome).__name__}: {outcome}"
            return self._error(prepared.v2, 500, message)
        try:
            if prepared.v2:
                return self._encode_arrays(prepared, outcome)
            if self.postprocessed:
                response = self._check_response(outcome)
                return 200, 0, [RESULT_OPEN, response.model_dump_json().encode(), RESULT_CLOSE]
            result = {name: _json_value(array) for name, array in outcome.items()}
            return 200, 0, [RESULT_OPEN, dump_json(result), RESULT_CLOSE]
        except Exception as exc:  # whatever it returned costs this request alone
            return self._bad_response(prepared, exc)

    def _encode_arrays(self, prepared: Prepared, arrays: Arrays) -> tuple[int, int, list[bytes]]:
        tensors = []
        chunks: list[bytes] = []
        for spec, binary in prepared.outputs or ():
            array = arrays.get(spec.name)
            if array is None:
                continue  # an optional output the model did not produce
            data, raw = encode_array(array, spec.datatype, binary)
            tensor: dict[str, Any] = {
                "name": spec.name,
                "datatype": spec.datatype,
                "shape": list(array.shape),
            }
            if binary:
                tensor["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                tensor["data"] = data
            tensors.append(tensor)
        return self._v2_response(prepared, tensors, chunks)


def _join(arrays: list[NDArray[Any]], pad: float | None) -> NDArray[Any]:
    """Concatenate along dimension 0, padding the other dimensions to the largest first."""
    if pad is not None and len({a.shape[1:] for a in arrays}) > 1:
        widest = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in arrays), strict=True))
        padded = []
        for array in arrays:
            widths = [(0, 0)] + [(0, w - s) for w, s in zip(widest, array.shape[1:], strict=True)]
            padded.append(np.pad(array, widths, constant_values=pad))
        arrays = padded
    return np.concatenate(arrays, axis=0)


_NUMPY_DATATYPES = {np.dtype(dtype).str: datatype for datatype, dtype in DATATYPES.items()}


def datatype_of(array: NDArray[Any]) -> str:
    """The v2 datatype of an array (object and string arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    datatype = _NUMPY_DATATYPES.get(array.dtype.newbyteorder("<").str) or _NUMPY_DATATYPES.get(
        array.dtype.str
    )
    if datatype is None:
        raise TypeError(f"numpy dtype {array.dtype} has no v2 datatype")
    return datatype


def v2_binary_request(inputs: dict[str, Any]) -> tuple[bytes, int]:
    """A v2 infer body with every input as binary data: ``(body, header length)``."""
    described = []
    chunks = []
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array)
        _, raw = encode_array(array, datatype, True)
        described.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        chunks.append(raw)
    header = json.dumps({"inputs": described, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(chunks), len(header)


def v2_binary_response(body: bytes, header_length: int) -> Arrays:
    """The output arrays of a v2 response (binary or JSON data)."""
    header = json.loads(body[: header_length or len(body)])
    offset = header_length
    arrays: Arrays = {}
    for output in header["outputs"]:
        tensor = Tensor(output["name"], output["datatype"], tuple(output["shape"]))
        size = (output.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            raw = memoryview(body)[offset : offset + size]
            offset += size
        arrays[tensor.name] = array_from_v2(
            tensor, output["datatype"], output["shape"], output.get("data"), raw
        )
    return arrays


def _json_value(array: NDArray[Any]) -> Any:
    """An output array as nested JSON lists (BYTES elements as text)."""
    if array.dtype == object:
        decoded = [x.decode(errors="replace") if isinstance(x, bytes) else x for x in array.flat]
        array = np.array(decoded, dtype=object).reshape(array.shape)
    return array.tolist()
