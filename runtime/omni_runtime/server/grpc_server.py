"""gRPC's wire protocol over ``http2.py``: the server that answers ``--grpc-port``.

It serves the method handlers a generated ``add_*Servicer_to_server`` registers (KServe v2's
``GRPCInferenceService`` here), calling the servicer's coroutines with a context that offers
what grpcio's does to them (``invocation_metadata``, ``abort``, ``set_trailing_metadata``,
``set_code``, ``set_details``, ``time_remaining``, ``peer``). It exists because grpcio's
asyncio server spends several times the CPU of the HTTP front end on each call (see
docs/benchmarks.md); the protocol it speaks is the same, and ``server.grpc_server =
"grpcio"`` in omni.toml serves with grpcio instead.

Per call: the request's messages (length-prefixed, ``gzip`` or ``deflate`` where the client
compressed them, at most ``max_message`` bytes each), a ``grpc-timeout`` as a deadline
(DEADLINE_EXCEEDED), a reset by the client as cancellation; the answer is headers, the
response messages and trailers with ``grpc-status``, ``grpc-message`` and the trailing
metadata (or, with no message, trailers only).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any
from urllib.parse import quote

import grpc

from omni_runtime.server.grpc_context import Abort, CallContext, Requests
from omni_runtime.server.http2 import DATA, HEADERS, H2Connection, H2Stream
from omni_runtime.server.http2_frames import header_block

__all__ = ["GrpcServer"]

log = logging.getLogger("omni.grpc")

_PREFIX = struct.Struct(">BI")
_RESPONSE_HEADERS = header_block([
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
])  # fmt: skip
_RESERVED = {b"content-type", b"te", b"grpc-encoding", b"grpc-accept-encoding", b"grpc-timeout"}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_MAX_DETAILS = 8192


class GrpcServer:
    """Listens on one address and serves ``handlers`` (full method path -> RpcMethodHandler)."""

    def __init__(
        self, handlers: dict[str, Any], max_message: int, max_connections: int = 1000
    ) -> None:
        self.handlers = {path.encode(): handler for path, handler in handlers.items()}
        self.max_message = max_message
        self.max_connections = max_connections
        self.connections: set[H2Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._trailers: dict[tuple[int, str, tuple[tuple[str, Any], ...]], bytes] = {}

    async def start(self, host: str, port: int) -> int:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            self._connection, host, port, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _connection(self) -> H2Connection:
        connection = H2Connection(Calls(self))
        if len(self.connections) >= self.max_connections:
            # At the limit (server.max_connections, as on HTTP): the longest idle connection
            # with no call open is closed for the new one; with none, the new one is refused.
            idle = [c for c in self.connections if not c.streams and not c.going_away]
            if idle:
                min(idle, key=lambda c: c.active).go_away()
            else:
                connection.going_away = True  # sent GOAWAY as soon as it is made
        self.connections.add(connection)
        connection.closed.add_done_callback(lambda _: self.connections.discard(connection))
        return connection

    async def stop(self, grace: float | None = None) -> None:
        """Take no new call; let the calls in progress end within ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        waits = [c.closed for c in self.connections]
        if waits:
            await asyncio.wait(waits, timeout=grace)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def trailers(self, code: int, details: str, metadata: Sequence[tuple[str, Any]]) -> bytes:
        """The trailers' header block (cached: most calls end the same few ways)."""
        key = (code, details, tuple(metadata))
        block = self._trailers.get(key)
        if block is None:
            headers = [(b"grpc-status", str(code).encode())]
            if details:
                message = quote(details[:_MAX_DETAILS], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
                headers.append((b"grpc-message", message.encode()))
            for name, value in metadata:
                if name.endswith("-bin"):
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    headers.append((name.encode(), base64.b64encode(raw).rstrip(b"=")))
                else:
                    headers.append((name.encode(), str(value).encode()))
            block = header_block(headers)
            if len(self._trailers) > 1024:
                self._trailers.clear()
            self._trailers[key] = block
        return block


class Calls:
    """The calls of one connection (http2's StreamHandler)."""

    __slots__ = ("server",)

    def __init__(self, server: GrpcServer) -> None:
        self.server = server

    def on_headers(self, stream: H2Stream) -> None:
        path = content_type = encoding = timeout = None
        for name, value in stream.headers:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name == b"grpc-timeout":
                timeout = value
        if content_type is None or not content_type.startswith(b"application/grpc"):
            stream.send([(HEADERS, header_block([(b":status", b"415")]), True)])
            return
        handler = self.server.handlers.get(path or b"")
        call = Call(self.server, stream, handler, encoding)
        stream.call = call
        if handler is None:
            call.finish(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path!r}")
            return
        if encoding not in (None, b"identity", b"gzip", b"deflate"):
            call.finish(grpc.StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {encoding!r}")
            return
        if timeout is not None:
            call.deadline(timeout)
        if handler.request_streaming:
            call.start()

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        call = stream.call
        if call is not None and not call.done:
            call.feed(data)

    def on_end(self, stream: H2Stream) -> None:
        call = stream.call
        if call is not None and not call.done:
            call.end()

    def on_reset(self, stream: H2Stream) -> None:
        call = stream.call
        if call is not None:
            call.cancel()


class Call:
    __slots__ = (
        "buffer", "code", "context", "deadline_at", "details", "done", "encoding", "handler",
        "messages", "requests", "sent_headers", "server", "stream", "task", "timer",
    )  # fmt: skip

    def __init__(
        self, server: GrpcServer, stream: H2Stream, handler: Any, encoding: bytes | None
    ) -> None:
        self.server = server
        self.stream = stream
        self.handler = handler
        self.encoding = encoding
        self.buffer = b""
        self.messages: list[bytes] = []  # a unary call's request
        self.requests: Requests | None = None  # a streaming call's
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_at: float | None = None
        self.sent_headers = False
        self.done = False
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.context = CallContext(self)

    # -- receiving -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while len(buffer) >= 5:
            compressed, length = _PREFIX.unpack_from(buffer)
            if length > self.server.max_message:
                self.finish(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a request message of {length} bytes is larger than the server's limit of "
                    f"{self.server.max_message} bytes",
                )
                return
            if len(buffer) < 5 + length:
                break
            message = buffer[5 : 5 + length]
            buffer = buffer[5 + length :]
            if compressed:
                try:
                    message = self._decompress(message)
                except (zlib.error, ValueError) as exc:
                    self.finish(grpc.StatusCode.INTERNAL, f"a request message: {exc}")
                    return
            if self.requests is not None:
                self.requests.put(message)
            else:
                self.messages.append(message)
        self.buffer = buffer

    def _decompress(self, message: bytes) -> bytes:
        if self.encoding not in (b"gzip", b"deflate"):
            raise ValueError("compressed without a grpc-encoding")
        wbits = 31 if self.encoding == b"gzip" else 15
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(message, self.server.max_message + 1)
        if len(out) > self.server.max_message or inflater.unconsumed_tail:
            raise ValueError(f"larger than the server's limit of {self.server.max_message} bytes")
        return out

    def end(self) -> None:
        if self.buffer:
            self.finish(grpc.StatusCode.INTERNAL, "the request ended inside a message")
        elif self.requests is not None:
            self.requests.close()
        elif self.task is None:
            if len(self.messages) != 1:
                got = len(self.messages)
                self.finish(grpc.StatusCode.UNIMPLEMENTED, f"a unary call with {got} messages")
                return
            self.start()

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        if self.handler.request_streaming:
            self.requests = Requests(self.handler.request_deserializer or _same)
            self.task = self.server.loop.create_task(self._run(self._stream()))
        else:
            self.task = self.server.loop.create_task(self._run(self._unary(self.messages[0])))

    async def _run(self, work: Coroutine[Any, Any, None]) -> None:
        """``work``, its failures turned into the call's status."""
        try:
            await work
        except Abort as abort:
            self.finish(abort.code, abort.details)
        except asyncio.CancelledError:
            self._cancelled()
            raise
        except Exception as exc:
            self._failed(exc)

    async def _unary(self, body: bytes) -> None:
        request = (self.handler.request_deserializer or _same)(body)
        response = await self.handler.unary_unary(request, self.context)
        payload = (self.handler.response_serializer or _same)(response)
        if self.done:
            return
        self.done = True
        self._stop_timer()
        code, details = self.code or grpc.StatusCode.OK, self.details
        trailers = self.server.trailers(code.value[0], details, self.context.trailing)
        self.stream.send([
            (HEADERS, _RESPONSE_HEADERS, False),
            (DATA, _PREFIX.pack(0, len(payload)) + payload, False),
            (HEADERS, trailers, True),
        ])  # fmt: skip

    async def _stream(self) -> None:
        assert self.requests is not None
        if self.handler.response_streaming:
            responses = self.handler.stream_stream(self.requests, self.context)
        else:
            responses = _one(self.handler.stream_unary(self.requests, self.context))
        async for response in responses:
            if self.done:
                return
            payload = (self.handler.response_serializer or _same)(response)
            items = [(DATA, _PREFIX.pack(0, len(payload)) + payload, False)]
            if not self.sent_headers:
                self.sent_headers = True
                items.insert(0, (HEADERS, _RESPONSE_HEADERS, False))
            self.stream.send(items)
            await self.stream.wait_drained()
        self.finish(self.code or grpc.StatusCode.OK, self.details)

    def finish(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with ``code``: trailers (or trailers only), once."""
        if self.done:
            return
        self.done = True
        self._stop_timer()
        trailers = self.server.trailers(code.value[0], details, self.context.trailing)
        if self.sent_headers:
            self.stream.send([(HEADERS, trailers, True)])
        else:
            self.stream.send([(HEADERS, _RESPONSE_HEADERS + trailers, True)])
        if self.task is not None and not self.task.done() and self.task is not _current():
            self.task.cancel()

    def _failed(self, exc: Exception) -> None:
        log.exception("gRPC: %s failed", self._method())
        self.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _cancelled(self) -> None:
        if not self.done and self.stream.closed:  # reset by the client: nobody to answer
            self.done = True
            self._stop_timer()

    def cancel(self) -> None:
        """The client reset the stream (or went away)."""
        self._stop_timer()
        if self.requests is not None:
            self.requests.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.done = True

    def deadline(self, value: bytes) -> None:
        try:
            seconds = int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
        except (KeyError, ValueError):
            self.finish(grpc.StatusCode.INTERNAL, f"a grpc-timeout of {value!r}")
            return
        self.deadline_at = time.monotonic() + seconds
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _method(self) -> str:
        for name, value in self.stream.headers:
            if name == b":path":
                return value.decode(errors="replace")
        return "a call"


def _same(message: Any) -> Any:
    return message


def _current() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


async def _one(response: Any) -> AsyncIterator[Any]:
    yield await response
