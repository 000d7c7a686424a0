"""``RepositoryModelLoad`` with model files (``file:...`` parameters, bytes), over gRPC as
over HTTP (``model_files.py``)."""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from omni_runtime.server.model_control import ControlError
from omni_runtime.server.model_files import ModelFiles

__all__ = ["load_files", "names_files"]


def names_files(request: Any) -> bool:
    """Whether a RepositoryModelLoadRequest carries model files."""
    return any(key.startswith("file:") for key in request.parameters)


async def load_files(files: ModelFiles | None, request: Any, context: Any) -> Any:
    name = request.model_name
    parameters = {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for key, value in request.parameters.items()
    }
    if files is None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{name}': this node loads no files"
        )
    assert files is not None
    try:
        error = await files.load(name, parameters)
    except ControlError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{name}': {exc}")
    if error:
        await context.abort(grpc.StatusCode.INTERNAL, f"failed to load model '{name}': {error}")
    return service_pb2.RepositoryModelLoadResponse()
