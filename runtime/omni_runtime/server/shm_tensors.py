"""Infer requests that name system shared-memory regions, turned into the v2 binary-tensor
form the worker takes, and the worker's answer written back into the regions.

Only a request whose inference header holds ``"shared_memory_region"`` comes here (one
substring search on the hot path); the worker never sees a region. An input read from a
region travels to the worker as binary data (``binary_data_size``); an output meant for a
region is asked of the worker as binary data, written into the region, and answered as Triton
answers it: no data, the parameters ``shared_memory_region`` and ``shared_memory_byte_size``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from omni_runtime.server.shared_memory import Region, SharedMemory, SharedMemoryError
from omni_sdk.envelopes import v2_error_body

__all__ = ["REGION_MARK", "OutputRegion", "request_from_regions", "response_to_regions"]

REGION_MARK = b'"shared_memory_region"'
SHM_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
ITEM_SIZE = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class OutputRegion:
    """Where one requested output goes: the region, and the slice of it the client gave."""

    output: str
    region: Region
    offset: int
    byte_size: int


def _bad(message: str) -> SharedMemoryError:
    return SharedMemoryError(400, message)


def _slice(memory: SharedMemory, what: str, params: dict[str, Any]) -> tuple[Region, int, int]:
    """The region, offset and byte size a tensor's parameters name, checked against the
    region's registered size."""
    try:
        region = memory.get(params.get("shared_memory_region"))
    except SharedMemoryError as exc:
        raise _bad(f"{what}: {exc}") from None
    size = _whole(params.get("shared_memory_byte_size"), what, "shared_memory_byte_size")
    offset = _whole(params.get("shared_memory_offset", 0), what, "shared_memory_offset")
    if offset + size > region.byte_size:
        raise _bad(
            f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} is past "
            f"the end of shared memory region '{region.name}' ({region.byte_size} bytes)"
        )
    return region, offset, size


def _whole(value: Any, what: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{what}: '{field}' must be a whole number >= 0, not {value!r}")
    return value


def _expected_size(item: dict[str, Any]) -> int | None:
    """Bytes a fixed-size tensor of this datatype and shape holds; None when unknown (BYTES)."""
    datatype = item.get("datatype")
    item_size = ITEM_SIZE.get(datatype) if isinstance(datatype, str) else None
    shape = item.get("shape")
    if item_size is None or not isinstance(shape, list):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None  # the worker names what is wrong with the shape
    return math.prod(shape) * item_size


def request_from_regions(
    memory: SharedMemory, body: bytes, header_length: int
) -> tuple[bytes, int, list[OutputRegion]]:
    """The request with every input named by a region read from it (as binary data), its
    new header length, and where the outputs meant for regions go."""
    try:
        header = json.loads(body[:header_length] if header_length else body)
    except (ValueError, RecursionError):
        return body, header_length, []  # the worker says what is wrong with it
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list):
        return body, header_length, []
    binary = memoryview(body)[header_length:] if header_length else memoryview(b"")
    position = 0
    chunks: list[bytes | memoryview] = []
    budget = memory.max_request_bytes
    total = len(body)
    for item in inputs:
        params = item.get("parameters") if isinstance(item, dict) else None
        if not isinstance(params, dict):
            continue
        if "shared_memory_region" in params:
            what = f"input '{item.get('name')}'"
            region, offset, size = _slice(memory, what, params)
            expected = _expected_size(item)
            if expected is not None and expected != size:
                raise _bad(
                    f"{what}: shared_memory_byte_size is {size} bytes, but shape "
                    f"{item.get('shape')} of {item.get('datatype')} holds {expected}"
                )
            total += size
            if budget is not None and total > budget:
                raise SharedMemoryError(
                    413, f"{what}: the inputs read from shared memory and the request come to "
                    f"more than the server's limit of {budget} bytes (server.max_body_size in "
                    "omni.toml)",
                )  # fmt: skip
            chunks.append(memory.read(region, offset, size))
            item.pop("data", None)
            kept = {k: v for k, v in params.items() if k not in SHM_PARAMETERS}
            item["parameters"] = {**kept, "binary_data_size": size}
        elif "binary_data_size" in params:
            size = params["binary_data_size"]
            if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                chunks.append(binary[position : position + size])
                position += size
    if position < len(binary):
        chunks.append(binary[position:])  # unclaimed bytes: the worker refuses them
    plans = _output_regions(memory, header)
    encoded = json.dumps(header).encode()
    if not chunks:
        return encoded, 0, plans
    return b"".join([encoded, *chunks]), len(encoded), plans


def _output_regions(memory: SharedMemory, header: dict[str, Any]) -> list[OutputRegion]:
    requested = header.get("outputs")
    if not isinstance(requested, list):
        return []
    plans = []
    for item in requested:
        params = item.get("parameters") if isinstance(item, dict) else None
        if not isinstance(params, dict) or "shared_memory_region" not in params:
            continue
        name = item.get("name")
        region, offset, size = _slice(memory, f"output '{name}'", params)
        plans.append(OutputRegion(str(name), region, offset, size))
        kept = {k: v for k, v in params.items() if k not in SHM_PARAMETERS}
        item["parameters"] = {**kept, "binary_data": True}
    return plans


def response_to_regions(
    memory: SharedMemory,
    model: str,
    plans: list[OutputRegion],
    answer: tuple[int, int, bytes],
) -> tuple[int, int, bytes]:
    """The worker's answer with each output meant for a region written there (all or none),
    as Triton answers it; a 400 naming the output when one does not fit."""
    status, header_length, body = answer
    if status != 200 or not plans:
        return answer
    try:
        return _write_outputs(memory, plans, header_length, body)
    except SharedMemoryError as exc:
        return exc.status, 0, v2_error_body(f"model '{model}': {exc}")
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, OSError) as exc:
        message = f"model '{model}': its outputs could not be written into shared memory: {exc!r}"
        return 500, 0, v2_error_body(message)


def _write_outputs(
    memory: SharedMemory, plans: list[OutputRegion], header_length: int, body: bytes
) -> tuple[int, int, bytes]:
    header = json.loads(body[:header_length] if header_length else body)
    wanted = {plan.output: plan for plan in plans}
    view = memoryview(body)
    position = header_length
    kept: list[memoryview] = []
    writes: list[tuple[OutputRegion, memoryview]] = []
    for output in header.get("outputs", []):
        params = output.get("parameters") or {}
        size = params.get("binary_data_size")
        data = None
        if isinstance(size, int) and size >= 0:
            data = view[position : position + size]
            position += size
        plan = wanted.get(output.get("name"))
        if plan is None:
            if data is not None:
                kept.append(data)
            continue
        if data is None:
            raise SharedMemoryError(500, f"output '{plan.output}' came back without its data")
        if len(data) > plan.byte_size:
            raise _bad(
                f"output '{plan.output}' needs {len(data)} bytes, but shared memory region "
                f"'{plan.region.name}' was given {plan.byte_size} for it "
                "(shared_memory_byte_size)"
            )
        if memory.regions.get(plan.region.name) is not plan.region:
            raise _bad(
                f"output '{plan.output}': shared memory region '{plan.region.name}' was "
                "unregistered while the request ran"
            )
        writes.append((plan, data))
        answered: dict[str, Any] = {
            "shared_memory_region": plan.region.name,
            "shared_memory_byte_size": len(data),
        }
        if plan.offset:
            answered["shared_memory_offset"] = plan.offset
        output["parameters"] = answered
    for plan, data in writes:
        memory.write(plan.region, plan.offset, data)
    encoded = json.dumps(header).encode()
    if not kept:
        return 200, 0, encoded
    return 200, len(encoded), b"".join([encoded, *kept])
