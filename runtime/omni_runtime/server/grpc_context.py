"""What a gRPC call's servicer coroutine gets from ``grpc_server.py``: its ``context`` (the part
of grpcio's servicer context Omni's servicer uses) and, for a streaming call, its requests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

if TYPE_CHECKING:
    from omni_runtime.server.grpc_server import Call

__all__ = ["Abort", "CallContext", "Requests"]

_RESERVED = {b"content-type", b"te", b"grpc-encoding", b"grpc-accept-encoding", b"grpc-timeout"}


class Abort(Exception):
    """``context.abort``: the call ends with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Requests:
    """A streaming call's request messages, as the servicer reads them (``async for``)."""

    __slots__ = ("closed", "deserialize", "messages", "waiter")

    def __init__(self, deserialize: Callable[[bytes], Any]) -> None:
        self.deserialize = deserialize
        self.messages: deque[bytes] = deque()
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def put(self, message: bytes) -> None:
        self.messages.append(message)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        while not self.messages:
            if self.closed:
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.deserialize(self.messages.popleft())


class CallContext:
    """What a servicer's coroutine gets as ``context`` (the part of grpcio's it uses)."""

    __slots__ = ("_call", "_metadata", "trailing")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._metadata: tuple[tuple[str, Any], ...] | None = None
        self.trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        if self._metadata is None:
            found: list[tuple[str, Any]] = []
            for name, value in self._call.stream.headers:
                if name.startswith(b":") or name in _RESERVED:
                    continue
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    with contextlib.suppress(ValueError):
                        found.append((key, base64.b64decode(value + b"=" * (-len(value) % 4))))
                else:
                    found.append((key, value.decode("latin-1")))
            self._metadata = tuple(found)
        return self._metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing = tuple(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._call.code = code

    def set_details(self, details: str) -> None:
        self._call.details = details

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> NoReturn:
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise Abort(code, details)

    def time_remaining(self) -> float | None:
        at = self._call.deadline_at
        return None if at is None else max(0.0, at - time.monotonic())

    def cancelled(self) -> bool:
        return self._call.stream.closed and not self._call.done

    def done(self) -> bool:
        return self._call.done

    def peer(self) -> str:
        transport = self._call.stream.connection.transport
        address = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(address, tuple) and len(address) >= 2:  # as grpcio writes it
            if ":" in str(address[0]):
                return f"ipv6:[{address[0]}]:{address[1]}"
            return f"ipv4:{address[0]}:{address[1]}"
        return "unknown"
