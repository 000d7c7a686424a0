"""The gRPC port's own HTTP/2 server (server/http2.py, server/grpc_server.py), spoken to by
grpcio's client: unary and streaming calls, large messages both ways (flow control),
compressed requests, metadata, status codes, deadlines, cancellation, and peers that break the
protocol or flood it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import pytest
from hpack import Encoder

from omni_runtime.server.grpc_server import GrpcServer

MAX = 8 << 20
# One event loop for the module: grpcio's asyncio client keeps a poller bound to the first
# loop it ran on, and calls into it after that loop closed.
LOOP = asyncio.new_event_loop()


def on_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        LOOP.run_until_complete(test())

    return run


class Behaviour:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.held = 0

    async def hold(self, request: bytes, context: Any) -> bytes:
        self.held += 1
        self.entered.set()
        await self.release.wait()
        return b"held"

    async def echo(self, request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata(
            [("echo-key", metadata.get("key", "")), ("raw-bin", b"\x00\xff")]
        )
        if "blob-bin" in metadata:
            return bytes(metadata["blob-bin"])
        return request

    async def big(self, request: bytes, context: Any) -> bytes:
        return request * 4

    async def fail(self, request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "model 'ünïcode/x' is not found: 100%")

    async def crash(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("a bug")

    async def slow(self, request: bytes, context: Any) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()


def handlers(behaviour: Behaviour) -> dict[str, Any]:
    unary = {
        name: getattr(behaviour, name) for name in ("echo", "big", "fail", "crash", "slow", "hold")
    }
    found = {
        f"/test.Svc/{name}": grpc.unary_unary_rpc_method_handler(fn) for name, fn in unary.items()
    }
    found["/test.Svc/chat"] = grpc.stream_stream_rpc_method_handler(behaviour.chat)
    return found


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[GrpcServer, str, Behaviour]]:
    behaviour = Behaviour()
    server = GrpcServer(handlers(behaviour), MAX)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"127.0.0.1:{port}", behaviour
    finally:
        await server.stop(1.0)


def channel(address: str, **options: Any) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, **options)


@on_loop
async def test_unary_calls_carry_messages_metadata_and_status() -> None:
    async with serving() as served:
        _, address, _ = served
        async with channel(address) as chan:
            echo = chan.unary_unary("/test.Svc/echo")
            call = echo(b"hello", metadata=[("key", "v1")])
            assert await call == b"hello"
            trailing = dict(await call.trailing_metadata())
            assert trailing["echo-key"] == "v1" and trailing["raw-bin"] == b"\x00\xff"
            assert await echo(b"", metadata=[("blob-bin", b"\x01\x02")]) == b"\x01\x02"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await chan.unary_unary("/test.Svc/fail")(b"x")
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert failed.value.details() == "model 'ünïcode/x' is not found: 100%"
            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                await chan.unary_unary("/test.Svc/crash")(b"x")
            assert crashed.value.code() == grpc.StatusCode.UNKNOWN
            assert "RuntimeError: a bug" in (crashed.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await chan.unary_unary("/test.Svc/nope")(b"x")
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await echo(b"still served") == b"still served"  # nothing above broke the server


@on_loop
async def test_large_messages_flow_both_ways_within_the_windows() -> None:
    async with serving() as served:
        _, address, _ = served
        payload = bytes(range(256)) * (6 << 12)  # 6 MiB in, 24 MiB out
        async with channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as chan:
            answers = await asyncio.gather(
                *(chan.unary_unary("/test.Svc/big")(payload) for _ in range(3))
            )
        assert all(a == payload * 4 for a in answers)


@on_loop
async def test_compressed_requests_are_read() -> None:
    async with serving() as served:
        _, address, _ = served
        payload = b"compress me " * 10_000
        for algorithm in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            async with channel(address, compression=algorithm) as chan:
                assert await chan.unary_unary("/test.Svc/echo")(payload) == payload


@on_loop
async def test_a_message_over_the_limit_is_refused_naming_it() -> None:
    async with serving() as served:
        _, address, _ = served
        async with channel(address, options=[("grpc.max_send_message_length", -1)]) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await chan.unary_unary("/test.Svc/echo")(b"x" * (MAX + 1))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"limit of {MAX} bytes" in (refused.value.details() or "")
            # a compressed one that inflates past it too
            async with channel(address, compression=grpc.Compression.Gzip) as small:
                with pytest.raises(grpc.aio.AioRpcError) as bomb:
                    await small.unary_unary("/test.Svc/echo")(b"\0" * (MAX + 10))
                assert bomb.value.code() == grpc.StatusCode.INTERNAL
                assert "limit" in (bomb.value.details() or "")


@on_loop
async def test_a_deadline_ends_the_call_and_cancels_its_work() -> None:
    async with serving() as served:
        _, address, behaviour = served
        async with channel(address) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await chan.unary_unary("/test.Svc/slow")(b"", timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(behaviour.cancelled.wait(), 5)


@on_loop
async def test_a_call_the_client_cancels_is_cancelled_here() -> None:
    async with serving() as served:
        _, address, behaviour = served
        async with channel(address) as chan:
            call = chan.unary_unary("/test.Svc/slow")(b"")
            await asyncio.sleep(0.3)
            call.cancel()
            await asyncio.wait_for(behaviour.cancelled.wait(), 5)


@on_loop
async def test_streams_answer_each_message() -> None:
    async with serving() as served:
        _, address, _ = served
        async with channel(address) as chan:
            chat = chan.stream_stream("/test.Svc/chat")

            async def words() -> AsyncIterator[bytes]:
                for index in range(200):
                    yield f"w{index}".encode()

            answers = [a async for a in chat(words())]
        assert answers == [f"W{index}".encode() for index in range(200)]


class _Writes:
    """A connection's own transport, with what is written through it kept."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _frames_of(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream) of each frame in ``data``."""
    frames, offset = [], 0
    while len(data) - offset >= 9:
        head, flags, stream = struct.unpack_from(">IBI", data, offset)
        frames.append((head & 0xFF, flags, stream))
        offset += 9 + (head >> 8)
    return frames


@on_loop
async def test_answers_that_are_ready_together_leave_in_one_write() -> None:
    async with serving() as served:
        server, address, behaviour = served
        async with channel(address) as chan:
            hold = chan.unary_unary("/test.Svc/hold")
            calls = [hold(b"") for _ in range(3)]
            for _ in range(500):
                if behaviour.held == 3:
                    break
                await asyncio.sleep(0.01)
            (connection,) = server.connections
            spy = _Writes(connection.transport)
            connection.transport = spy
            behaviour.release.set()  # the three calls end in one turn of the loop
            assert await asyncio.gather(*calls) == [b"held"] * 3
            assert await hold(b"") == b"held"  # and a call after them has its own write
        ends = [
            {stream for kind, flags, stream in _frames_of(data) if kind == 1 and flags & 0x1}
            for data in spy.writes
        ]
        ends = [streams for streams in ends if streams]
        assert [len(streams) for streams in ends] == [3, 1], ends


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream) + payload


def _read_frames(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    data = b""
    sock.settimeout(5)
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    frames, offset = [], 0
    while len(data) - offset >= 9:
        head = struct.unpack_from(">I", data, offset)[0]
        length, kind = head >> 8, head & 0xFF
        frames.append((kind, data[offset + 4], data[offset + 9 : offset + 9 + length]))
        offset += 9 + length
    return frames


@on_loop
async def test_a_peer_that_is_not_http2_or_resets_in_a_flood_is_sent_away() -> None:
    async with serving() as served:
        _, address, _ = served
        host, port = address.rsplit(":", 1)

        def http1() -> list[tuple[int, int, bytes]]:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return _read_frames(sock)

        def rapid_reset() -> list[tuple[int, int, bytes]]:
            encoder = Encoder()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))
                headers = [(":method", "POST"), (":scheme", "http"), (":path", "/test.Svc/slow"),
                           (":authority", "x"), ("content-type", "application/grpc")]  # fmt: skip
                burst = b""
                for stream in range(1, 2 * 3000, 2):
                    burst += _frame(1, 0x4, stream, encoder.encode(headers))
                    burst += _frame(3, 0, stream, struct.pack(">I", 8))
                with _nothing():
                    sock.sendall(burst)
                return _read_frames(sock)

        frames = await asyncio.to_thread(http1)
        goaway = [f for f in frames if f[0] == 7]
        assert goaway and b"not HTTP/2" in goaway[0][2]
        frames = await asyncio.to_thread(rapid_reset)
        goaway = [f for f in frames if f[0] == 7]
        assert goaway and struct.unpack(">I", goaway[0][2][4:8])[0] == 0xB  # ENHANCE_YOUR_CALM
        async with channel(address) as chan:  # the server itself is unharmed
            assert await chan.unary_unary("/test.Svc/echo")(b"ok") == b"ok"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], OSError)  # the server may close mid-burst


@on_loop
async def test_stopping_lets_calls_in_progress_finish() -> None:
    async with serving() as served:
        server, address, behaviour = served
        async with channel(address) as chan:
            call = chan.unary_unary("/test.Svc/hold")(b"")
            await asyncio.wait_for(behaviour.entered.wait(), 5)
            stopping = asyncio.ensure_future(server.stop(5.0))
            await asyncio.sleep(0.2)
            assert not stopping.done()  # it waits for the call
            behaviour.release.set()
            assert await call == b"held"
            await asyncio.wait_for(stopping, 5)


@on_loop
async def test_at_the_connection_limit_the_longest_idle_connection_makes_room() -> None:
    behaviour = Behaviour()
    server = GrpcServer(handlers(behaviour), MAX, max_connections=2)
    port = await server.start("127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    try:
        first, second = channel(address), channel(address)
        assert await first.unary_unary("/test.Svc/echo")(b"1") == b"1"
        assert await second.unary_unary("/test.Svc/echo")(b"2") == b"2"
        busy = second.unary_unary("/test.Svc/hold")(b"")
        await asyncio.wait_for(behaviour.entered.wait(), 5)
        async with channel(address) as third:  # the first, idle, is closed for it
            assert await third.unary_unary("/test.Svc/echo")(b"3") == b"3"
        behaviour.release.set()
        assert await busy == b"held"  # the busy one was left alone
        await first.close()
        await second.close()
    finally:
        await server.stop(1.0)
