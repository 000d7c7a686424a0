"""Triton's shared-memory extensions over gRPC: the ``SystemSharedMemory*`` RPCs, and infer
requests whose tensors name a region (the same registry and the same checks as over HTTP:
``shared_memory.py``, ``shm_tensors.py``). No CUDA region is ever registered: its status is
empty, unregistering one is a no-op, and ``CudaSharedMemoryRegister`` is UNIMPLEMENTED."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from omni_runtime.server.grpc_tensors import RequestError, infer_body, tensor_bytes
from omni_runtime.server.shared_memory import SharedMemory, SharedMemoryError, peer_uid
from omni_runtime.server.shm_api import CUDA_REFUSAL
from omni_runtime.server.shm_tensors import (
    SHM_PARAMETERS,
    OutputRegion,
    request_from_regions,
    response_to_regions,
)

__all__ = ["EXTENSIONS", "SharedMemory", "SharedMemoryRPCs", "request_body"]

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "system_shared_memory"]
Answer = tuple[int, int, bytes]  # a worker's answer: status, header length, body

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _peer(context: Any) -> tuple[str, int] | None:
    """The client's address and port from gRPC's peer string (``ipv4:127.0.0.1:5000``,
    ``ipv6:[::1]:5000``); None for any other kind of peer."""
    kind, _, rest = str(context.peer() or "").partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class SharedMemoryRPCs:
    """The shared-memory RPCs of ``InferenceService`` (a mixin: it brings ``_guard``)."""

    shared_memory: SharedMemory
    port: int | None = None  # the port the service listens on, once bound

    def serve_shared_memory(self, memory: SharedMemory, port: int | None) -> None:
        """Serve ``memory``'s regions (the HTTP app's too) to clients of ``port``."""
        self.shared_memory = memory
        self.port = port

    async def _guard(self, context: Any, admin: bool = False) -> None:
        raise NotImplementedError  # InferenceService's

    async def _refuse(self, context: Any, error: SharedMemoryError) -> None:
        await context.abort(_CODES.get(error.status, grpc.StatusCode.INTERNAL), str(error))

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        response = service_pb2.SystemSharedMemoryStatusResponse()
        try:
            regions = self.shared_memory.status(request.name)
        except SharedMemoryError as exc:
            await self._refuse(context, exc)
        for region in regions:
            response.regions[region["name"]].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        try:
            uid = peer_uid(_peer(context), self.port)
            self.shared_memory.register(
                request.name, request.key, request.offset, request.byte_size, uid
            )
        except SharedMemoryError as exc:
            await self._refuse(context, exc)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        self.shared_memory.unregister(request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        if request.name:
            message = f"Unable to find cuda shared memory region: '{request.name}'"
            await context.abort(grpc.StatusCode.NOT_FOUND, message)
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CUDA_REFUSAL)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        return service_pb2.CudaSharedMemoryUnregisterResponse()


# -- infer requests that name regions ------------------------------------------------------


def names_regions(request: Any) -> bool:
    """Whether any input or output of a ``ModelInferRequest`` names a shared-memory region
    (plain loops: on every request, they cost half of what ``any`` over generators does)."""
    for tensor in request.inputs:
        if "shared_memory_region" in tensor.parameters:
            return True
    for output in request.outputs:  # noqa: SIM110 (the loop is the point)
        if "shared_memory_region" in output.parameters:
            return True
    return False


def _value(parameter: Any) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _region_parameters(parameters: Any) -> dict[str, Any]:
    return {key: _value(parameters[key]) for key in SHM_PARAMETERS if key in parameters}


def regions_request(memory: SharedMemory, request: Any) -> tuple[bytes, int, list[OutputRegion]]:
    """A ``ModelInferRequest`` naming regions as the v2 body the worker takes (inputs read
    from their regions), its header length, and where the outputs meant for regions go."""
    raw = list(request.raw_input_contents)
    plain = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
    if raw and len(raw) != len(plain):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {len(plain)} inputs that are not "
            "in shared memory; send every such input raw or none"
        )
    contents = iter(raw)
    inputs, chunks = [], []
    for tensor in request.inputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if "shared_memory_region" in tensor.parameters:
            entry["parameters"] = _region_parameters(tensor.parameters)
        else:
            data = next(contents) if raw else tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [
            {
                "name": o.name,
                "parameters": {"binary_data": True, **_region_parameters(o.parameters)},
            }
            for o in request.outputs
        ]
    else:
        header["parameters"] = {"binary_data_output": True}
    encoded = json.dumps(header).encode()
    try:
        return request_from_regions(memory, b"".join([encoded, *chunks]), len(encoded))
    except SharedMemoryError as exc:
        raise RequestError(str(exc)) from None


def request_body(
    memory: SharedMemory, request: Any, model: str
) -> tuple[bytes, int, Callable[[Answer], Answer] | None]:
    """A ``ModelInferRequest`` as the v2 body the worker takes and its header's length, and
    what writes the worker's answer into shared-memory regions (None: nothing to write)."""
    if not names_regions(request):
        body, header_length = infer_body(request)
        return body, header_length, None
    body, header_length, plans = regions_request(memory, request)

    def after(answer: Answer) -> Answer:
        return response_to_regions(memory, model, plans, answer)

    return body, header_length, after if plans else None
