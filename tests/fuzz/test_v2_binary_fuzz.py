"""Hypothesis against the v2 binary tensor extension of a real runtime: header JSON,
Inference-Header-Content-Length, datatypes, shapes, BYTES length prefixes, and bodies cut
short or running long. A fixed budget of cases, the same every run."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.runtime import RunningRuntime
from tests.fuzz.conftest import AUTH, MODELS, check_answer

SIZES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1,
         "INT16": 2, "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}  # fmt: skip
DATATYPES = [*SIZES, "BYTES"]
# The inputs of the fixture models (tests/fixtures/packages/tensor-models): datatype and rank,
# 0 for a scalar field (shape [1]).
INPUTS = {
    "@test/identity": {**{dt.lower(): (dt, 1) for dt in DATATYPES}, "matrix": ("FP32", 2)},
    "@test/numbers": {"ints": ("INT64", 1), "floats": ("FP32", 1)},
    "@test/everything": {
        "text": ("BYTES", 0), "words": ("BYTES", 1), "count": ("INT64", 0),
        "ratio": ("FP32", 0), "flag": ("BOOL", 0), "grid": ("INT64", 2),
        "items": ("BYTES", 0), "note": ("BYTES", 0),
    },
}  # fmt: skip
JSON_TEXTS = ['[{"label": "a", "weight": 2}]', "[]", "{}", "[1", '"x"', "null"]


REQUIRED = {"@test/everything": ["text"]}
# Integers at the edges of the datatypes; @test/numbers answers 13 with one no INT64 holds.
EDGE_INTS = [0, 13, -1, 255, 256, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 2**80]
# Most cases are well formed, so that they reach the model; the rest break one thing each.
TENSOR_FAULTS = ["none"] * 10 + ["name", "datatype", "shape", "size", "data"]
REQUEST_FAULTS = ["none"] * 6 + ["length", "header", "truncated", "overlong"]


@st.composite
def bytes_elements(draw: st.DrawFn, count: int, fault: bool) -> bytes:
    """BYTES in binary form: a 4-byte length before each element (with a fault, a lying one)."""
    element = st.one_of(
        st.sampled_from(JSON_TEXTS).map(str.encode),
        st.text(max_size=6).map(str.encode),
        st.binary(max_size=12),
    )
    items = draw(st.lists(element, min_size=count, max_size=count))
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    if fault and raw and draw(st.booleans()):
        return struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + raw[4:]
    if fault and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    return raw


def json_element(datatype: str) -> st.SearchStrategy[Any]:
    """One element of JSON ``data``: in range for its datatype, or past its edges."""
    if datatype == "BYTES":
        return st.one_of(st.sampled_from(JSON_TEXTS), st.text(max_size=6))
    if datatype == "BOOL":
        return st.booleans()
    if datatype.startswith("FP"):
        names = st.sampled_from(["NaN", "Infinity", "-Infinity"])
        return st.one_of(st.floats(allow_nan=False, allow_infinity=False), names)
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 300), st.integers())


@st.composite
def tensor(draw: st.DrawFn, model: str, name: str, rows: int) -> tuple[dict[str, Any], bytes]:
    """One input: its header entry and its binary bytes; with a fault, one of them is wrong."""
    fault = draw(st.sampled_from(TENSOR_FAULTS))
    datatype, rank = INPUTS[model][name]
    extra = draw(st.lists(st.integers(0, 3), min_size=max(rank - 1, 0), max_size=max(rank - 1, 0)))
    shape: Any = [1] if rank == 0 else [rows, *extra]
    if fault == "name":
        name = draw(st.one_of(st.text(max_size=4), st.sampled_from(sorted(INPUTS[model]))))
    elif fault == "datatype":
        datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=5)))
    elif fault == "shape":
        shape = draw(
            st.one_of(
                st.lists(st.integers(-2, 2**40), max_size=3),
                st.sampled_from([[2**62, 2**62], [-1], [True], ["2"], "3", None, [0]]),
            )
        )
    count = 1
    for dim in shape if isinstance(shape, list) else ():
        count *= dim if type(dim) is int and 0 <= dim <= 4 else 1
    if draw(st.integers(0, 2)) == 0:  # this one as JSON data, beside the binary ones
        element = json_element(datatype if datatype in DATATYPES else "INT64")
        data = draw(st.lists(element, min_size=count, max_size=count))
        return {"name": name, "datatype": datatype, "shape": shape, "data": data}, b""
    if datatype == "BYTES":
        raw = draw(bytes_elements(count, fault == "data"))
    else:
        size = SIZES.get(datatype, 4) * count
        raw = draw(st.binary(min_size=size, max_size=size))
        if fault == "data":
            raw = draw(st.binary(max_size=size + 9).filter(lambda b: len(b) != size))
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    declared: Any = len(raw)
    if fault == "size":
        declared = draw(
            st.one_of(st.integers(-3, len(raw) + 8), st.sampled_from([None, "8", 2**70, 1.5]))
        )
    if declared is not None:
        entry["parameters"] = {"binary_data_size": declared}
    return entry, raw


@st.composite
def request(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A model, a binary v2 body and its headers: mostly well formed, often not."""
    model = draw(st.sampled_from(MODELS))
    optional = [n for n in INPUTS[model] if n not in REQUIRED.get(model, [])]
    required = REQUIRED.get(model, [])
    names = required + draw(
        st.lists(st.sampled_from(optional), min_size=0 if required else 1, max_size=3, unique=True)
    )
    rows = draw(st.integers(0, 4))
    tensors = [draw(tensor(model, name, rows)) for name in names]
    header: dict[str, Any] = {"inputs": [entry for entry, _ in tensors]}
    if draw(st.integers(0, 3)):
        header["parameters"] = {"binary_data_output": draw(st.sampled_from([True, True, False]))}
    if draw(st.integers(0, 3)) == 0:
        wanted = draw(st.lists(st.sampled_from([*INPUTS[model], "nope"]), max_size=3))
        header["outputs"] = [
            {"name": n, "parameters": {"binary_data": draw(st.booleans())}} for n in wanted
        ]
    if draw(st.integers(0, 4)) == 0:
        header["id"] = draw(st.one_of(st.text(max_size=5), st.integers()))
    head = json.dumps(header).encode()
    body = head + b"".join(raw for _, raw in tensors)
    length: Any = len(head)
    fault = draw(st.sampled_from(REQUEST_FAULTS))
    if fault == "length":
        length = draw(
            st.one_of(st.integers(-2, len(body) + 4), st.sampled_from(["", "x", "1e3", str(2**70)]))
        )
    elif fault == "header":
        cut = draw(st.integers(0, len(head)))
        body = head[:cut] + body[len(head) :]
    elif fault == "truncated" and len(body) > len(head):
        body = body[: draw(st.integers(len(head), len(body) - 1))]
    elif fault == "overlong":
        body += draw(st.binary(min_size=1, max_size=16))
    return model, body, {"Inference-Header-Content-Length": str(length)}


@pytest.fixture(scope="module")
def http(fuzz_runtime: RunningRuntime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_runtime.url, timeout=30, headers=AUTH) as client:
        yield client


def test_no_binary_request_gets_a_runtime_5xx(http: httpx.Client) -> None:
    @given(case=request())
    @settings(
        max_examples=400,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # a fixed budget: no shrinking
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    def run(case: tuple[str, bytes, dict[str, str]]) -> None:
        model, body, headers = case
        response = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        length = int(response.headers.get("inference-header-content-length", 0))
        check_answer(response.status_code, length, response.content, f"{model} {headers} {body!r}")

    run()
