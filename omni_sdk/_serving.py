"""Runs one engine behind both APIs: decodes requests, calls the engine, encodes answers.

The worker process and the in-process test helpers share this code, so what a model author
tests in-process is exactly what the runtime serves.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from omni_sdk._engine import Engine
from omni_sdk._streaming import ajoin, sync_join
from omni_sdk._tensors import (
    DEFAULT_MAX_TENSOR_ELEMENTS,
    INT_RANGES,
    InvalidInput,
    check_int_range,
    encode_binary,
    json_data,
    tensor_to_value,
    value_to_tensor,
)
from omni_sdk.envelopes import RESULT_CLOSE, RESULT_OPEN, ai_error_body, dump_json, v2_error_body
from omni_sdk.sequences import (
    SequenceControls,
    SequenceError,
    SequenceId,
    control_values,
    read_sequence,
)

__all__ = ["EngineRunner", "Prepared", "describe_validation_error"]


@dataclass(slots=True)
class Prepared:
    """A decoded request, or the error response that decoding produced."""

    v2: bool
    request: BaseModel | None = None
    status: int = 200
    error: str = ""
    request_id: str | None = None
    outputs: list[tuple[Any, bool]] | None = None  # (TensorSpec, binary) for v2
    tensors: dict[str, Any] | None = None  # input arrays, for tensor-native engines
    input_ns: int = 0  # how long decoding it took (the worker measures it)

    @property
    def valid(self) -> bool:
        return self.request is not None or self.tensors is not None


class EngineRunner:
    """One loaded engine instance and the codecs of both APIs around it.

    ``runner_for(engine)`` picks this or, for a ``TensorEngine``, a ``TensorEngineRunner``,
    which decodes v2 tensors straight into numpy arrays and batches along dimension 0.
    Nothing a request holds, and nothing an engine returns, raises out of ``prepare_*`` or
    ``respond``: each becomes that request's 4xx or 5xx.
    """

    model_version = "1"  # what v2 answers name as ``model_version`` (the worker sets it)
    sequence: SequenceControls | None = None  # the control inputs it fills (``use_sequences``)

    def __init__(
        self,
        engine: Engine,
        model_name: str | None = None,
        max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
    ) -> None:
        self.engine = engine
        self.model_name = model_name or type(engine).name
        self.max_tensor_elements = max_tensor_elements
        signature = type(engine).signature()
        self.request_model = signature.request_model
        self.response_model = signature.response_model
        self.inputs = {spec.name: spec for spec in signature.inputs}
        self.outputs = {spec.name: spec for spec in signature.outputs}
        cls = type(engine)
        self.batch_size = cls.max_batch_size if cls.max_batch_size > 1 else 1
        call = engine.infer_batch if self.batch_size > 1 else engine.infer
        self.is_async = inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
        # A streaming engine's chunks, joined into one answer for whoever did not ask for a
        # stream (the worker streams by calling the engine's own infer).
        self._infer: Callable[[Any], Any] = engine.infer
        if cls.is_streaming():
            model = self.response_model
            if inspect.isasyncgenfunction(engine.infer):
                self._infer = lambda request: ajoin(model, engine.infer(request))
            else:
                self._infer = lambda request: sync_join(model, engine.infer(request))
        self._label = f"model '{self.model_name}'"

    # -- decoding ------------------------------------------------------------------------

    def prepare_json(self, body: bytes | memoryview) -> Prepared:
        """Decode an ``/ai/run`` body; a request that cannot be read gets a 400."""
        try:
            return self._prepare_json(body)
        except Exception as exc:
            return self._undecodable(False, exc)

    def prepare_v2(self, body: bytes | memoryview, header_length: int) -> Prepared:
        """Decode a v2 infer body (JSON or binary); a request that cannot be read gets a 400."""
        try:
            return self._prepare_v2(body, header_length)
        except Exception as exc:
            return self._undecodable(True, exc)

    def _undecodable(self, v2: bool, exc: Exception) -> Prepared:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._bad(v2, f"{self._label}: could not read the request: {detail}")

    def _prepare_json(self, body: bytes | memoryview) -> Prepared:
        try:
            data = json.loads(bytes(body) if isinstance(body, memoryview) else body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return self._bad(False, f"{self._label}: the body is not valid JSON: {exc}")
        if not isinstance(data, dict):
            return self._bad(False, f"{self._label}: the body must be a JSON object")
        data.pop("options", None)
        try:
            self._check_int_ranges(data)
        except InvalidInput as exc:
            return self._bad(False, f"{self._label}: {exc}")
        return self._validate(False, data)

    def _check_int_ranges(self, data: dict[str, Any]) -> None:
        """An integer field holds what its v2 tensor holds (INT64): the same refusal as v2."""
        for name, spec in self.inputs.items():
            value = data.get(name)
            if spec.datatype not in INT_RANGES or value is None:
                continue
            items = value if isinstance(value, list) else [value]
            if spec.rank > 1:
                items = [x for row in items for x in (row if isinstance(row, list) else [row])]
            check_int_range(name, spec.datatype, [x for x in items if type(x) is int])

    def _prepare_v2(self, body: bytes | memoryview, header_length: int) -> Prepared:
        view = memoryview(body)
        if header_length > len(view):
            return self._bad(
                True,
                f"{self._label}: Inference-Header-Content-Length is {header_length} but the "
                f"body has only {len(view)} bytes",
            )
        end = header_length or len(view)
        try:
            header = json.loads(bytes(view[:end]))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return self._bad(True, f"{self._label}: the inference header is not valid JSON: {exc}")
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            return self._bad(True, f"{self._label}: the request needs an 'inputs' list")
        try:
            parameters = header.get("parameters")
            filled = None
            if parameters is not None or self.sequence is not None:
                filled = self._sequence_inputs(parameters)
            values = self._decode_inputs(header["inputs"], view, end, filled)
            outputs = self._requested_outputs(header)
        except InvalidInput as exc:
            return self._bad(True, f"{self._label}: {exc}")
        prepared = self._validate(True, values)
        request_id = header.get("id")
        prepared.request_id = request_id if isinstance(request_id, str) else None
        prepared.outputs = outputs
        return prepared

    def _decode_inputs(
        self,
        inputs: list[Any],
        view: memoryview,
        offset: int,
        filled: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        values: dict[str, Any] = filled or {}
        decode = self._decode_tensor
        for item in inputs:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput("every entry of 'inputs' needs a 'name'")
            name = item["name"]
            spec = self.inputs.get(name)
            if spec is None:
                known = ", ".join(self.inputs) or "none"
                raise InvalidInput(f"has no input '{name}' (its inputs: {known})")
            if name in values:
                if filled and name in filled:
                    raise InvalidInput(
                        f"input '{name}' is filled from the request's sequence parameters "
                        "(a control input of [model.sequence]); do not send it"
                    )
                raise InvalidInput(f"input '{name}' appears twice")
            raw = None
            params = item.get("parameters")
            size = params.get("binary_data_size") if isinstance(params, dict) else None
            if size is not None:
                if not isinstance(size, int) or size < 0:
                    raise InvalidInput(f"input '{name}': binary_data_size must be an integer")
                if offset + size > len(view):
                    raise InvalidInput(
                        f"input '{name}': binary_data_size is {size} but only "
                        f"{len(view) - offset} bytes of binary data remain in the body"
                    )
                raw = view[offset : offset + size]
                offset += size
            values[name] = decode(
                spec, item.get("datatype"), item.get("shape"), item.get("data"), raw
            )
        if offset != len(view):
            raise InvalidInput(
                f"the body has {len(view) - offset} bytes of binary data that no input claims"
            )
        missing = [n for n, s in self.inputs.items() if s.required and n not in values]
        if missing:
            raise InvalidInput(f"missing input '{missing[0]}'")
        return values

    # -- sequences -----------------------------------------------------------------------

    def use_sequences(self, controls: SequenceControls) -> None:
        """Fill ``controls``' inputs from every v2 request's sequence parameters; ValueError
        (naming the input) when the model has no such input or it cannot hold the value."""
        for name, control in controls.inputs().items():
            spec = self.inputs.get(name)
            if spec is None:
                known = ", ".join(self.inputs) or "none"
                raise ValueError(
                    f"{self._label}: sequence.{control} names the input '{name}', which the "
                    f"model does not have (its inputs: {known})"
                )
            numeric = spec.datatype != "BYTES" and spec.datatype != "BOOL"
            if control == "correlation_id" and not (numeric or spec.datatype == "BYTES"):
                raise ValueError(
                    f"{self._label}: sequence.correlation_id input '{name}' is {spec.datatype}; "
                    "it must be an integer or BYTES tensor"
                )
            if control != "correlation_id" and not (numeric or spec.datatype == "BOOL"):
                raise ValueError(
                    f"{self._label}: sequence.{control} input '{name}' is {spec.datatype}; it "
                    "must be a number or BOOL tensor"
                )
        self.sequence = controls

    def _sequence_inputs(self, parameters: Any) -> dict[str, Any] | None:
        """The control inputs a request's sequence parameters fill (None: no sequence)."""
        try:
            found = read_sequence(parameters)
        except SequenceError as exc:
            raise InvalidInput(str(exc)) from None
        if self.sequence is None:
            if found is None:
                return None
            raise InvalidInput(
                "has no sequence support, but the request carries sequence parameters "
                "(sequence_id, sequence_start, sequence_end); send it without them, or "
                "declare the model's control inputs in omni.toml ([model.sequence])"
            )
        if found is None:
            raise InvalidInput(
                "keeps state per sequence: every request needs the parameter 'sequence_id' "
                "(and 'sequence_start' on a sequence's first request)"
            )
        sequence_id, start, end = found
        return {
            name: self._control_value(self.inputs[name], value)
            for name, value in control_values(self.sequence, sequence_id, start, end).items()
        }

    def _control_value(self, spec: Any, value: SequenceId) -> Any:
        """One control input's value as its field holds it (a scalar, or one row)."""
        if isinstance(value, str) and spec.datatype != "BYTES":
            raise InvalidInput(
                f"sequence_id {value!r} is a string, but the correlation input '{spec.name}' "
                f"is {spec.datatype}; send an integer sequence_id"
            )
        filled: Any = value
        if spec.datatype == "BYTES":
            filled = str(value)
        elif spec.datatype == "BOOL":
            filled = bool(value)
        elif spec.datatype.startswith("FP"):
            filled = float(value)
        elif spec.datatype in INT_RANGES:
            check_int_range(spec.name, spec.datatype, [value])
        for _ in range(spec.rank):
            filled = [filled]
        return filled

    def _decode_tensor(
        self, spec: Any, datatype: Any, shape: Any, data: Any, raw: memoryview | None
    ) -> Any:
        return tensor_to_value(spec, datatype, shape, data, raw, self.max_tensor_elements)

    def _requested_outputs(self, header: dict[str, Any]) -> list[tuple[Any, bool]]:
        params = header.get("parameters")
        binary_default = (
            bool(params.get("binary_data_output")) if isinstance(params, dict) else False
        )
        requested = header.get("outputs")
        if not requested:
            return [(spec, binary_default) for spec in self.outputs.values()]
        if not isinstance(requested, list):
            raise InvalidInput("'outputs' must be a list")
        chosen = []
        for item in requested:
            name = item.get("name") if isinstance(item, dict) else None
            spec = self.outputs.get(name) if isinstance(name, str) else None
            if spec is None:
                known = ", ".join(self.outputs)
                raise InvalidInput(f"has no output {name!r} (its outputs: {known})")
            out_params = item.get("parameters")
            binary = binary_default
            if isinstance(out_params, dict) and "binary_data" in out_params:
                binary = bool(out_params["binary_data"])
            chosen.append((spec, binary))
        return chosen

    def _validate(self, v2: bool, values: dict[str, Any]) -> Prepared:
        try:
            return Prepared(v2=v2, request=self.request_model.model_validate(values))
        except ValidationError as exc:
            return self._bad(v2, f"{self._label}: {describe_validation_error(exc, 'input')}")

    def _bad(self, v2: bool, message: str, status: int = 400) -> Prepared:
        return Prepared(v2=v2, status=status, error=message)

    # -- running -------------------------------------------------------------------------

    def run(self, batch: list[Prepared]) -> list[Any]:
        """Outcomes (a response or an exception) for the valid requests of ``batch``."""
        requests = [p.request for p in batch if p.request is not None]
        if self.batch_size > 1:
            outcomes: list[Any] = []
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                try:
                    outcomes.extend(self._check_batch(self.engine.infer_batch(chunk), len(chunk)))
                except Exception as exc:
                    outcomes.extend([exc] * len(chunk))
            return outcomes
        outcomes = []
        infer = self._infer
        for request in requests:
            try:
                outcomes.append(infer(request))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def arun(self, batch: list[Prepared]) -> list[Any]:
        """As ``run``, for engines whose ``infer``/``infer_batch`` is ``async def``."""
        requests = [p.request for p in batch if p.request is not None]
        if self.batch_size > 1:
            chunks = [
                requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)
            ]
            results = await asyncio.gather(
                *(self.engine.infer_batch(chunk) for chunk in chunks),  # type: ignore[arg-type]
                return_exceptions=True,
            )
            outcomes: list[Any] = []
            for chunk, result in zip(chunks, results, strict=True):
                try:
                    outcomes.extend(self._check_batch(result, len(chunk)))
                except Exception as exc:
                    outcomes.extend([exc] * len(chunk))
            return outcomes
        return list(
            await asyncio.gather(*(self._infer(r) for r in requests), return_exceptions=True)
        )

    def _check_batch(self, result: Any, expected: int) -> list[Any]:
        if isinstance(result, BaseException):
            raise result
        if not isinstance(result, list) or len(result) != expected:
            got = f"{len(result)} items" if isinstance(result, list) else type(result).__name__
            raise TypeError(f"infer_batch returned {got} for {expected} requests")
        return result

    # -- encoding ------------------------------------------------------------------------

    def respond_all(
        self, batch: list[Prepared], outcomes: list[Any]
    ) -> list[tuple[int, int, list[bytes]]]:
        results = iter(outcomes)
        return [self.respond(p, next(results) if p.request is not None else None) for p in batch]

    def respond(self, prepared: Prepared, outcome: Any) -> tuple[int, int, list[bytes]]:
        """``(status, inference_header_length, body parts)`` for one request."""
        if prepared.request is None:
            return self._error(prepared.v2, prepared.status, prepared.error)
        if isinstance(outcome, BaseException):
            message = f"{self._label} failed: {type(outcome).__name__}: {outcome}"
            return self._error(prepared.v2, 500, message)
        try:
            dumped = self._check_response(outcome).model_dump(mode="json")
            if not prepared.v2:
                return 200, 0, [RESULT_OPEN, dump_json(dumped), RESULT_CLOSE]
            return self._encode_v2(prepared, dumped)
        except Exception as exc:  # whatever it returned costs this request alone
            return self._bad_response(prepared, exc)

    def encode_v2_chunk(self, prepared: Prepared, chunk: Any) -> tuple[int, list[bytes]]:
        """One chunk of a streamed v2 request as a v2 inference response: (its JSON
        header's length, or 0 for JSON alone; the body's parts). Raises for a bad chunk."""
        _, header_length, parts = self._encode_v2(
            prepared, self._check_response(chunk).model_dump(mode="json")
        )
        return header_length, parts

    def _bad_response(self, prepared: Prepared, exc: Exception) -> tuple[int, int, list[bytes]]:
        detail = str(exc) or type(exc).__name__
        return self._error(prepared.v2, 500, f"{self._label} returned a bad response: {detail}")

    def _check_response(self, outcome: Any) -> BaseModel:
        if isinstance(outcome, self.response_model):
            return outcome
        if isinstance(outcome, dict):
            try:
                return self.response_model.model_validate(outcome)
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, "output")) from None
        raise TypeError(f"expected {self.response_model.__name__}, got {type(outcome).__name__}")

    def _encode_v2(
        self, prepared: Prepared, dumped: dict[str, Any]
    ) -> tuple[int, int, list[bytes]]:
        tensors = []
        chunks: list[bytes] = []
        for spec, binary in prepared.outputs or ():
            shape, flat = value_to_tensor(spec, dumped.get(spec.name))
            if spec.datatype in INT_RANGES:
                check_int_range(spec.name, spec.datatype, flat, "output")
            tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
            if binary:
                raw = encode_binary(spec, flat)
                tensor["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                tensor["data"] = json_data(spec, flat)
            tensors.append(tensor)
        return self._v2_response(prepared, tensors, chunks)

    def _v2_response(
        self, prepared: Prepared, tensors: list[dict[str, Any]], chunks: list[bytes]
    ) -> tuple[int, int, list[bytes]]:
        """The v2 inference response: its JSON header, then any binary outputs in order."""
        header: dict[str, Any] = {
            "model_name": self.model_name,
            "model_version": self.model_version,
        }
        if prepared.request_id is not None:
            header["id"] = prepared.request_id
        header["outputs"] = tensors
        encoded = dump_json(header)
        if not chunks:
            return 200, 0, [encoded]
        return 200, len(encoded), [encoded, *chunks]

    def _error(self, v2: bool, status: int, message: str) -> tuple[int, int, list[bytes]]:
        return status, 0, [v2_error_body(message) if v2 else ai_error_body(status, message)]


def describe_validation_error(exc: ValidationError, role: str) -> str:
    """One sentence per problem, naming the field: ``input 'text': Field required``."""
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(x) for x in error["loc"]) or "(root)"
        parts.append(f"{role} '{loc}': {error['msg']}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
