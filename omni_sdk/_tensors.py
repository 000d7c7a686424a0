"""The mapping between pydantic fields and KServe v2 tensors (DESIGN.md, *contract*).

A top-level field of an engine's input or output model is a v2 tensor of the same name:
``str`` → BYTES [1], ``list[str]`` → BYTES [-1], ``int`` → INT64 [1], ``float`` → FP32 [1],
``bool`` → BOOL [1], ``list[float]`` → FP32 [-1], ``list[list[float]]`` → FP32 [-1, -1], and
so on. A field of any other type travels as BYTES [1] holding its JSON text.
"""

from __future__ import annotations

import array
import json
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

__all__ = [
    "DEFAULT_MAX_TENSOR_ELEMENTS",
    "InvalidInput",
    "TensorSpec",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
    "specs_of",
]

# The most elements one v2 input may declare (server.max_tensor_elements): 64 MiB of FP32.
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 24


class InvalidInput(ValueError):
    """A request does not fit the engine's inputs; the message names the tensor or field."""


# datatype → (array typecode, element size); BYTES has its own framing.
_NUMERIC = {
    "BOOL": ("b", 1),
    "INT8": ("b", 1),
    "INT16": ("h", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
    "FP16": ("e", 2),
    "FP32": ("f", 4),
    "FP64": ("d", 8),
}
_ACCEPTED = {
    "float": ("FP32", "FP64", "FP16"),
    "int": ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8"),
    "bool": ("BOOL",),
    "str": ("BYTES",),
    "bytes": ("BYTES",),
    "json": ("BYTES",),
}
_DATATYPE = {
    "float": "FP32",
    "int": "INT64",
    "bool": "BOOL",
    "str": "BYTES",
    "bytes": "BYTES",
    "json": "BYTES",
}
_ELEMENT_TYPES = {float: "float", int: "int", bool: "bool", str: "str", bytes: "bytes"}
# The integers each integer datatype holds: JSON data outside them is refused, not wrapped.
INT_RANGES = {
    "INT8": (-(1 << 7), (1 << 7) - 1),
    "INT16": (-(1 << 15), (1 << 15) - 1),
    "INT32": (-(1 << 31), (1 << 31) - 1),
    "INT64": (-(1 << 63), (1 << 63) - 1),
    "UINT8": (0, (1 << 8) - 1),
    "UINT16": (0, (1 << 16) - 1),
    "UINT32": (0, (1 << 32) - 1),
    "UINT64": (0, (1 << 64) - 1),
}
# Non-finite floats in JSON, as the protobuf JSON mapping writes them (docs/http-api.md).
FLOAT_NAMES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


@dataclass(frozen=True)
class TensorSpec:
    """One v2 tensor: its name, datatype and shape, and the Python shape it maps to."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    element: str = "json"  # float | int | bool | str | bytes | json
    rank: int = 0  # 0: a scalar field, 1: a list, 2: a list of lists
    required: bool = True
    accepted: tuple[str, ...] = field(default=())

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _classify(annotation: Any) -> tuple[str, int]:
    annotation = _unwrap_optional(annotation)
    rank = 0
    while typing.get_origin(annotation) in (list, tuple, typing.Sequence) and rank < 2:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is tuple and not (len(args) == 2 and args[1] is ...):
            return "json", 0
        annotation = _unwrap_optional(args[0]) if args else Any
        rank += 1
    element = _ELEMENT_TYPES.get(annotation)
    if element is None or typing.get_origin(annotation) is not None:
        return "json", 0
    return element, rank


def specs_of(model: type[BaseModel]) -> list[TensorSpec]:
    """The v2 tensors of a pydantic model's top-level fields, in declaration order."""
    specs = []
    for name, info in model.model_fields.items():
        element, rank = _classify(info.annotation)
        shape = (1,) if rank == 0 else (-1,) * rank
        specs.append(
            TensorSpec(
                name=name,
                datatype=_DATATYPE[element],
                shape=shape,
                element=element,
                rank=rank,
                required=info.is_required(),
                accepted=_ACCEPTED[element],
            )
        )
    return specs


def decode_bytes_tensor(raw: bytes | memoryview, name: str) -> list[bytes]:
    """Split the v2 binary BYTES encoding (4-byte little-endian length, then the bytes)."""
    view = memoryview(raw)
    items = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 4:
            raise InvalidInput(f"input '{name}': BYTES data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input '{name}': a BYTES element says {length} bytes but only "
                f"{end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        flat: list[Any] = []
        for row in data:
            if not isinstance(row, list):
                raise InvalidInput(f"input '{name}': 'data' mixes lists and scalars")
            flat.extend(_flatten(row, name))
        return flat
    return data


def _count(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def element_count(name: str, shape: list[int], max_elements: int | None) -> int:
    """The elements ``shape`` holds; more than ``max_elements`` (server.max_tensor_elements)
    is refused before anything is allocated for them."""
    count = _count(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidInput(
            f"input '{name}' has shape {shape}: {count} elements, more than the server's limit "
            f"of {max_elements} (server.max_tensor_elements)"
        )
    return count


def check_int_range(name: str, datatype: str, items: list[Any], role: str = "input") -> None:
    """Refuse integers that ``datatype`` cannot hold, naming the tensor: ``InvalidInput`` for
    an input, ``ValueError`` for an output an engine made."""
    low, high = INT_RANGES[datatype]
    if not items:
        return
    try:
        smallest, largest = min(items), max(items)
    except (TypeError, ValueError):  # other types too: pydantic names them; check the numbers
        numbers = [x for x in items if isinstance(x, int | float)]
        if not numbers:
            return
        smallest, largest = min(numbers), max(numbers)
    for value in (smallest, largest):
        if not low <= value <= high:
            error = InvalidInput if role == "input" else ValueError
            raise error(
                f"{role} '{name}': {value} is out of range for {datatype} ({low} to {high})"
            )


def tensor_to_value(
    spec: TensorSpec,
    datatype: Any,
    shape: Any,
    data: Any,
    raw: bytes | memoryview | None,
    max_elements: int | None = None,
) -> Any:
    """One v2 input tensor → the Python value of its field, checking datatype and shape.

    JSON integers must fit the declared datatype and the field's own (INT64 for ``int``);
    FP data may hold "NaN", "Infinity" and "-Infinity" (pydantic reads those strings).
    """
    name = spec.name
    if datatype not in spec.accepted:
        raise InvalidInput(
            f"input '{name}' has datatype {datatype}, expected {' or '.join(spec.accepted)}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if spec.rank == 0:
        if _count(shape) != 1 or len(shape) > 1:
            raise InvalidInput(f"input '{name}' has shape {shape}, expected [1]")
    elif len(shape) != spec.rank:
        expected = list(spec.shape)
        raise InvalidInput(f"input '{name}' has shape {shape}, expected {expected}")
    count = element_count(name, shape, max_elements)

    if raw is not None:
        if datatype == "BYTES":
            items: list[Any] = decode_bytes_tensor(raw, name)
        else:
            typecode, size = _NUMERIC[datatype]
            if len(raw) != count * size:
                raise InvalidInput(
                    f"input '{name}': shape {shape} of {datatype} needs {count * size} bytes, "
                    f"got {len(raw)}"
                )
            if typecode == "e":
                items = list(struct.unpack(f"<{count}e", raw))
            else:
                items = memoryview(raw).cast("B").cast(typecode).tolist()  # type: ignore[call-overload]
            if datatype == "BOOL":
                items = [bool(x) for x in items]
    else:
        if data is None:
            raise InvalidInput(f"input '{name}' has neither 'data' nor binary data")
        items = _flatten(data, name)
        if datatype in INT_RANGES:
            check_int_range(name, datatype, items)
            if spec.datatype != datatype and spec.datatype in INT_RANGES:
                check_int_range(name, spec.datatype, items)
    if len(items) != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} holds {count} elements, got {len(items)}"
        )

    if spec.element in ("str", "json"):
        try:
            items = [x.decode() if isinstance(x, bytes) else x for x in items]
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{name}': BYTES element is not valid UTF-8") from None
    if spec.element == "json":
        try:
            return json.loads(items[0]) if isinstance(items[0], str) else items[0]
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidInput(f"input '{name}': expected JSON text, {exc}") from None
    if spec.rank == 0:
        return items[0]
    if spec.rank == 1:
        return items
    width = shape[1]
    return [items[i : i + width] for i in range(0, count, width)]


def value_to_tensor(spec: TensorSpec, value: Any) -> tuple[list[int], list[Any]]:
    """A field's Python value → (shape, flat elements) for its v2 output tensor."""
    if spec.element == "json":
        return [1], [json.dumps(value, separators=(",", ":"), default=str)]
    if spec.rank == 0:
        return [1], [value]
    if value is None:
        return [0] * spec.rank, []
    if spec.rank == 1:
        return [len(value)], list(value)
    rows = len(value)
    width = len(value[0]) if rows else 0
    flat: list[Any] = []
    for row in value:
        if len(row) != width:
            raise ValueError(f"output '{spec.name}' is a ragged list of lists")
        flat.extend(row)
    return [rows, width], flat


def encode_binary(spec: TensorSpec, flat: list[Any]) -> bytes:
    if spec.datatype == "BYTES":
        return encode_bytes_tensor([x if isinstance(x, bytes) else str(x).encode() for x in flat])
    typecode, _ = _NUMERIC[spec.datatype]
    if typecode == "e":
        return struct.pack(f"<{len(flat)}e", *flat)
    return array.array(typecode, flat).tobytes()


def json_data(spec: TensorSpec, flat: list[Any]) -> list[Any]:
    if spec.datatype == "BYTES":
        return [x.decode(errors="replace") if isinstance(x, bytes) else x for x in flat]
    return flat
