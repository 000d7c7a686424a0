"""Where the gRPC front end listens: ``start_grpc_server`` serves ``InferenceService`` on
Omni's own HTTP/2 server (``grpc_server.py``) or, with ``server.grpc_server = "grpcio"``, on
grpcio's; ``grpc_authorizer`` checks the tokens a call's metadata carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc

from omni_runtime.scheduler import ModelDirectory
from omni_runtime.server.grpc_server import GrpcServer
from omni_runtime.server.grpc_service import InferenceService
from omni_runtime.server.model_files import ModelFiles
from omni_runtime.server.shared_memory import SharedMemory
from omni_runtime.server.tokens import Access, Tokens, authorized

__all__ = ["grpc_authorizer", "start_grpc_server"]


def grpc_authorizer(tokens: Tokens) -> Callable[[Any, bool], str | None]:
    """The token check: ``authorization: Bearer TOKEN`` metadata, as the header is on HTTP."""

    def authorize(context: Any, admin: bool) -> str | None:
        accepted = tokens.accepted(Access.ADMIN if admin else Access.API)
        if not accepted:
            return None
        headers = [
            (key.encode(), value.encode())
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        ]
        if authorized(headers, accepted):
            return None
        which = "OMNI_ADMIN_TOKEN" if admin else "OMNI_API_TOKEN"
        return f"missing or wrong token: send the metadata 'authorization: Bearer <{which}>'"

    return authorize


async def start_grpc_server(
    models: ModelDirectory,
    host: str,
    port: int,
    authorize: Callable[[Any, bool], str | None] | None = None,
    node: str | None = None,
    shared_memory: SharedMemory | None = None,
    files: ModelFiles | None = None,
) -> tuple[Any, int]:
    """Start serving on ``host:port`` (0: any free port); returns the server and its port."""
    max_message = int(models.settings.max_body_size) + (1 << 20)
    service = InferenceService(models, authorize or (lambda context, admin: None), node)
    service.files = files
    memory = shared_memory or SharedMemory()
    if models.settings.grpc_server == "omni":
        handlers = _Handlers()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, handlers)
        server = GrpcServer(handlers.found, max_message, models.settings.max_connections)
        service.serve_shared_memory(memory, None)
        bound = await server.start(host, port)
        service.serve_shared_memory(memory, bound)
        return server, bound
    aio = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", -1),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, aio)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = aio.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen for gRPC on {address}")
    service.serve_shared_memory(memory, bound)
    await aio.start()
    return aio, bound


class _Handlers:
    """Stands for a grpc server to a generated ``add_*_to_server``: collects its handlers."""

    def __init__(self) -> None:
        self.found: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.found.update({f"/{service}/{name}": h for name, h in handlers.items()})
