"""The pydantic ↔ v2 tensor mapping of DESIGN.md."""

from __future__ import annotations

import array
import struct

import pytest
from pydantic import BaseModel

from omni_sdk._tensors import (
    InvalidInput,
    decode_bytes_tensor,
    encode_binary,
    encode_bytes_tensor,
    specs_of,
    tensor_to_value,
    value_to_tensor,
)


class Everything(BaseModel):
    s: str
    ss: list[str]
    i: int
    f: float
    b: bool
    fs: list[float]
    ffs: list[list[float]]
    iis: list[list[int]]
    bs: list[bool]
    opt: int | None = None
    nested: dict[str, int] = {}


def test_contract_mapping() -> None:
    specs = {s.name: (s.datatype, list(s.shape)) for s in specs_of(Everything)}
    assert specs == {
        "s": ("BYTES", [1]),
        "ss": ("BYTES", [-1]),
        "i": ("INT64", [1]),
        "f": ("FP32", [1]),
        "b": ("BOOL", [1]),
        "fs": ("FP32", [-1]),
        "ffs": ("FP32", [-1, -1]),
        "iis": ("INT64", [-1, -1]),
        "bs": ("BOOL", [-1]),
        "opt": ("INT64", [1]),
        "nested": ("BYTES", [1]),
    }
    required = {s.name for s in specs_of(Everything) if s.required}
    assert "opt" not in required and "s" in required


def _spec(name: str):  # type: ignore[no-untyped-def]
    return next(s for s in specs_of(Everything) if s.name == name)


def test_json_and_binary_decode_to_the_same_values() -> None:
    spec = _spec("ffs")
    as_json = tensor_to_value(spec, "FP32", [2, 2], [[1, 2], [3, 4]], None)
    raw = array.array("f", [1, 2, 3, 4]).tobytes()
    assert as_json == tensor_to_value(spec, "FP32", [2, 2], None, raw) == [[1, 2], [3, 4]]
    assert tensor_to_value(spec, "FP64", [1, 2], [5, 6], None) == [[5, 6]]
    half = struct.pack("<2e", 1.5, 2.0)
    assert tensor_to_value(_spec("fs"), "FP16", [2], None, half) == [1.5, 2.0]


def test_bytes_tensors() -> None:
    raw = encode_bytes_tensor(["héllo".encode(), b""])
    assert decode_bytes_tensor(raw, "ss") == ["héllo".encode(), b""]
    assert tensor_to_value(_spec("ss"), "BYTES", [2], None, raw) == ["héllo", ""]
    with pytest.raises(InvalidInput, match="input 'ss': a BYTES element says 100 bytes"):
        decode_bytes_tensor(struct.pack("<I", 100) + b"abc", "ss")
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        tensor_to_value(_spec("s"), "BYTES", [1], None, encode_bytes_tensor([b"\xff"]))


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "data", "message"),
    [
        ("s", "FP32", [1], [1.0], "input 's' has datatype FP32, expected BYTES"),
        ("i", "INT64", [2], [1, 2], r"input 'i' has shape \[2\], expected \[1\]"),
        ("fs", "FP32", [3], [1, 2], r"shape \[3\] holds 3 elements, got 2"),
        ("ffs", "FP32", [4], [1, 2, 3, 4], r"expected \[-1, -1\]"),
        ("fs", "FP32", "3", [1], "'shape' must be a list"),
        ("fs", "FP32", [1], None, "neither 'data' nor binary data"),
    ],
)
def test_bad_tensors_name_the_input(
    name: str, datatype: str, shape: object, data: object, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        tensor_to_value(_spec(name), datatype, shape, data, None)


def test_binary_size_must_match_shape() -> None:
    with pytest.raises(InvalidInput, match="needs 12 bytes, got 8"):
        tensor_to_value(_spec("fs"), "FP32", [3], None, b"\0" * 8)


def test_outputs() -> None:
    assert value_to_tensor(_spec("ffs"), [[1.0, 2.0], [3.0, 4.0]]) == ([2, 2], [1.0, 2.0, 3.0, 4.0])
    assert value_to_tensor(_spec("s"), "x") == ([1], ["x"])
    assert value_to_tensor(_spec("nested"), {"a": 1}) == ([1], ['{"a":1}'])
    with pytest.raises(ValueError, match="ragged"):
        value_to_tensor(_spec("ffs"), [[1.0], [2.0, 3.0]])
    assert encode_binary(_spec("i"), [7]) == struct.pack("<q", 7)
    assert encode_binary(_spec("ss"), ["ab"]) == struct.pack("<I", 2) + b"ab"


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT64", 2**63), ("INT64", -(2**63) - 1), ("INT32", 2**31), ("INT8", -129),
     ("UINT8", 256), ("UINT8", -1), ("UINT32", 2**32), ("UINT64", 2**64)],
)  # fmt: skip
def test_json_integers_must_fit_their_datatype(datatype: str, value: int) -> None:
    with pytest.raises(InvalidInput, match=rf"input 'i': {value} is out of range for {datatype}"):
        tensor_to_value(_spec("i"), datatype, [1], [value], None)


def test_json_integers_must_fit_the_field_too() -> None:
    # UINT64 holds 2**63, but an int field is INT64: it cannot go out again.
    with pytest.raises(InvalidInput, match=r"out of range for INT64"):
        tensor_to_value(_spec("i"), "UINT64", [1], [2**63], None)
    assert tensor_to_value(_spec("i"), "UINT64", [1], [2**63 - 1], None) == 2**63 - 1
    assert tensor_to_value(_spec("iis"), "INT8", [1, 2], [[-128, 127]], None) == [[-128, 127]]
    # Values of other types go on to pydantic, which names them.
    assert tensor_to_value(_spec("iis"), "INT64", [1, 2], [["a", 2]], None) == [["a", 2]]
    with pytest.raises(InvalidInput, match=r"input 'iis': 1180591620717411303424 is out of"):
        tensor_to_value(_spec("iis"), "INT64", [1, 2], [["a", 2**70]], None)


def test_shapes_over_the_element_limit_are_refused() -> None:
    limit = 1000
    with pytest.raises(InvalidInput, match=r"input 'fs' has shape \[1001\]: 1001 elements, more"):
        tensor_to_value(_spec("fs"), "FP32", [1001], [1.0], None, limit)
    with pytest.raises(InvalidInput, match=r"server.max_tensor_elements"):
        tensor_to_value(_spec("ffs"), "FP32", [10**9, 10**9], None, b"", limit)
    assert tensor_to_value(_spec("fs"), "FP32", [2], [1.0, 2.0], None, limit) == [1.0, 2.0]
