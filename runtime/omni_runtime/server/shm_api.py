"""Triton's shared-memory extensions over HTTP: ``/v2/systemsharedmemory`` (status, register,
unregister; docs/http-api.md) and ``/v2/cudasharedmemory``, where no region is ever
registered: its status is empty, unregistering is a no-op, registering is refused."""

from __future__ import annotations

import json

from omni_runtime.server.http import HTTPError, Receive, Scope, Send, read_body, respond_json
from omni_runtime.server.shared_memory import SharedMemory, SharedMemoryError, peer_uid

__all__ = ["CUDA_REFUSAL", "SharedMemoryRoutes"]

CUDA_REFUSAL = (
    "CUDA shared memory is not supported by this server (it needs a GPU and CUDA IPC in the "
    "runtime); use system shared memory (/v2/systemsharedmemory) instead"
)


def _region_name(scope: Scope, action: str) -> str:
    """The region's name in ``/v2/...sharedmemory/region/{name}/{action}`` (ASGI decoded it)."""
    name = str(scope["path"]).partition("/region/")[2]
    return name[: len(name) - len(action) - 1]


class SharedMemoryRoutes:
    """The handlers; each takes ``(scope, receive, send, None)``."""

    def __init__(self, memory: SharedMemory, max_body: int) -> None:
        self.memory = memory
        self.max_body = max_body

    async def status(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(send, self.memory.status())

    async def region_status(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        try:
            await respond_json(send, self.memory.status(_region_name(scope, "status")))
        except SharedMemoryError as exc:
            raise HTTPError(exc.status, str(exc)) from None

    async def register(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        name = _region_name(scope, "register")
        body = await read_body(scope, receive, min(self.max_body, 1 << 16))
        try:
            request = json.loads(body or b"{}")
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, f"register '{name}': the body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise HTTPError(400, f"register '{name}': the body must be a JSON object")
        unknown = sorted(set(request) - {"key", "offset", "byte_size"})
        if unknown:
            raise HTTPError(
                400, f"register '{name}': unknown field(s) {unknown}; it takes key, offset, "
                "byte_size",
            )  # fmt: skip
        try:
            uid = peer_uid(scope.get("client"), (scope.get("server") or (None, None))[1])
            self.memory.register(
                name, request.get("key"), request.get("offset", 0), request.get("byte_size"), uid
            )
        except SharedMemoryError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        await respond_json(send, {})

    async def unregister_all(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        self.memory.unregister()
        await respond_json(send, {})

    async def unregister(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        self.memory.unregister(_region_name(scope, "unregister"))
        await respond_json(send, {})

    async def cuda_status(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(send, [])

    async def cuda_region_status(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        name = _region_name(scope, "status")
        raise HTTPError(404, f"Unable to find cuda shared memory region: '{name}'")

    async def cuda_unregister(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(send, {})

    async def cuda_register(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        raise HTTPError(501, CUDA_REFUSAL)
