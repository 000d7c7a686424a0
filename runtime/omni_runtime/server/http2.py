"""The server side of HTTP/2 (RFC 9113), as much of it as gRPC needs, on the event loop.

Frames are read and written here; header blocks are decoded by ``hpack`` (python-hyper's
HPACK), and the few header blocks the server sends are encoded without the dynamic table
(``header_block``), so nothing but the decoder keeps HPACK state. What a stream carries is
handed to a ``StreamHandler`` (``grpc_server.py``); what it answers goes out in order, DATA
as the peer's flow-control windows allow.

Limits against a peer that sends too much: at most ``MAX_STREAMS`` streams open at once
(more are refused with REFUSED_STREAM), header blocks of at most ``MAX_HEADER_BLOCK``
bytes, and a connection that resets streams faster than it lets them finish (the "rapid
reset" attack) is sent GOAWAY.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time
from typing import Any, Protocol, cast

from omni_runtime.server import http2_frames as wire
from omni_runtime.server.http2_frames import (
    DATA,
    HEADERS,
    BlockDecoder,
    ProtocolError,
    frame,
    header_frames,
)

__all__ = ["DATA", "HEADERS", "H2Connection", "H2Stream", "StreamHandler"]

log = logging.getLogger("omni.grpc")
MAX_STREAMS = 1000
MAX_HEADER_BLOCK = 64 << 10
WINDOW = (1 << 31) - 1  # what this side lets the peer send before it says it read it
RESETS_ALLOWED = 1000  # resets by the peer of streams not finished, beyond finished ones
_U32 = struct.Struct(">I")


class StreamHandler(Protocol):
    """What a connection hands each stream to (one per connection)."""

    def on_headers(self, stream: H2Stream) -> None: ...
    def on_data(self, stream: H2Stream, data: bytes) -> None: ...
    def on_end(self, stream: H2Stream) -> None: ...
    def on_reset(self, stream: H2Stream) -> None: ...


class H2Stream:
    __slots__ = (
        "call", "closed", "connection", "drained", "headers", "id", "pending", "received", "window",
    )  # fmt: skip

    def __init__(self, connection: H2Connection, stream_id: int, window: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.headers: list[tuple[bytes, bytes]] = []
        self.window = window  # what the peer lets this side send on it
        self.received = 0  # bytes the peer sent on it since this side last gave them back
        self.pending: collections.deque[tuple[int, bytes, bool]] = collections.deque()
        self.drained: asyncio.Future[None] | None = None
        self.closed = False  # reset, or answered to its end
        self.call: Any = None  # the handler's object for it

    def send(self, items: list[tuple[int, bytes, bool]]) -> None:
        """Queue ``(HEADERS or DATA, payload, end_stream)`` and send what the windows allow."""
        if self.closed:
            return
        self.pending.extend(items)
        self.connection.flush(self)

    async def wait_drained(self) -> None:
        """Until what was queued has gone out (backpressure for a streaming answer)."""
        if self.pending and not self.closed:
            if self.drained is None:
                self.drained = asyncio.get_running_loop().create_future()
            await self.drained


class H2Connection(asyncio.Protocol):
    def __init__(self, handler: StreamHandler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.decoder = BlockDecoder(MAX_HEADER_BLOCK)
        self.streams: dict[int, H2Stream] = {}
        self.buffer = b""
        self.preface = False
        self.last_stream = 0
        self.peer_window = 65535  # the connection's send window
        self.peer_initial = 65535  # each new stream's
        self.max_frame = 16384
        self.unacked = 0  # received on the connection since this side last said so
        self.continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self.blocked: collections.OrderedDict[int, H2Stream] = collections.OrderedDict()
        self.finished = 0
        self.resets = 0
        self.going_away = False
        self.paused: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.active = time.monotonic()  # when the peer last sent something
        self.out: list[bytes] = []  # frames to write at the end of this turn of the loop

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is its own
        settings = struct.pack(
            ">HIHIHIHI",
            wire.MAX_CONCURRENT_STREAMS, MAX_STREAMS,
            wire.INITIAL_WINDOW_SIZE, WINDOW,
            wire.ENABLE_PUSH, 0,
            wire.MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK,
        )  # fmt: skip
        grow = _U32.pack(WINDOW - 65535)
        self._write(frame(wire.SETTINGS, 0, 0, settings) + frame(wire.WINDOW_UPDATE, 0, 0, grow))
        if self.going_away:  # refused before it was made (the server's connection limit)
            self.go_away()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.out.clear()
        for stream in list(self.streams.values()):
            self._close(stream, reset=True)
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.paused is None or self.paused.done():
            self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.active = time.monotonic()
        buffer = self.buffer + data if self.buffer else data
        if not self.preface:
            if len(buffer) < len(wire.PREFACE):
                self.buffer = buffer
                return
            if not buffer.startswith(wire.PREFACE):
                self._fail(wire.PROTOCOL_ERROR, "not HTTP/2 (this port speaks gRPC)")
                return
            self.preface = True
            buffer = buffer[len(wire.PREFACE) :]
        offset, end = 0, len(buffer)
        try:
            while end - offset >= 9 and self.transport is not None:
                head = _U32.unpack_from(buffer, offset)[0]
                length, kind = head >> 8, head & 0xFF
                if length > 16384:  # the largest frame this side allows (its default)
                    self._fail(wire.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                    return
                if end - offset < 9 + length:
                    break
                flags = buffer[offset + 4]
                stream_id = _U32.unpack_from(buffer, offset + 5)[0] & 0x7FFFFFFF
                payload = buffer[offset + 9 : offset + 9 + length]
                offset += 9 + length
                self._dispatch(kind, flags, stream_id, payload)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        self.buffer = buffer[offset:]

    # -- receiving -----------------------------------------------------------------------

    def _dispatch(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is not None and kind != wire.CONTINUATION:
            raise ProtocolError(wire.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == wire.CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == wire.RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.resets += 1
                if self.resets > self.finished + RESETS_ALLOWED:
                    raise ProtocolError(wire.ENHANCE_YOUR_CALM, "too many streams reset")
                self._close(stream, reset=True)
        elif kind == wire.SETTINGS:
            if not flags & wire.ACK:
                self._settings(payload)
        elif kind == wire.PING:
            if not flags & wire.ACK:
                self._write(frame(wire.PING, wire.ACK, 0, payload))
        elif kind == wire.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == wire.GOAWAY:
            self.going_away = True
        elif kind == wire.PUSH_PROMISE:
            raise ProtocolError(wire.PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 says.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        received = len(payload)
        if flags & wire.PADDED:
            payload = payload[1 : len(payload) - payload[0]] if payload else b""
        self.unacked += received
        if self.unacked > WINDOW // 2:
            self._write(frame(wire.WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed:
            return  # a stream already reset or answered: its data is dropped
        stream.received += received
        if stream.received > WINDOW // 2:  # a long stream
            self._write(frame(wire.WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.received)))
            stream.received = 0
        if payload:
            self.handler.on_data(stream, payload)
        if flags & wire.END_STREAM:
            self.handler.on_end(stream)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ProtocolError(wire.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if flags & wire.PADDED:
            payload = payload[1 : len(payload) - payload[0]] if payload else b""
        if flags & wire.PRIORITY_FLAG:
            payload = payload[5:]
        if not flags & wire.END_HEADERS:
            self.continuing = (stream_id, flags, bytearray(payload))
            return
        self._header_block(stream_id, flags, payload)

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != stream_id:
            raise ProtocolError(wire.PROTOCOL_ERROR, "wire.CONTINUATION without HEADERS")
        block = self.continuing[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolError(wire.ENHANCE_YOUR_CALM, "a header block over 64 KiB")
        if flags & wire.END_HEADERS:
            first = self.continuing[1]
            self.continuing = None
            self._header_block(stream_id, first, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers of a request: only its end matters
            if flags & wire.END_STREAM and not stream.closed:
                self.handler.on_end(stream)
            return
        if stream_id <= self.last_stream:
            return  # a stream closed earlier
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._reset(stream_id, wire.REFUSED_STREAM)
            return
        stream = H2Stream(self, stream_id, self.peer_initial)
        stream.headers = headers
        self.streams[stream_id] = stream
        self.handler.on_headers(stream)
        if flags & wire.END_STREAM and not stream.closed:
            self.handler.on_end(stream)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(wire.FRAME_SIZE_ERROR, "a wire.SETTINGS frame of odd length")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == wire.INITIAL_WINDOW_SIZE:
                if value > WINDOW:
                    raise ProtocolError(wire.FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                delta, self.peer_initial = value - self.peer_initial, value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == wire.MAX_FRAME_SIZE:
                self.max_frame = max(16384, min(value, (1 << 24) - 1))
            elif key == wire.HEADER_TABLE_SIZE:
                pass  # this side never indexes what it sends
        self._write(frame(wire.SETTINGS, wire.ACK, 0))
        self._unblock()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(wire.FRAME_SIZE_ERROR, "a wire.WINDOW_UPDATE frame not of 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.peer_window += increment
            self._unblock()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.window += increment
            self.flush(stream)

    # -- sending -------------------------------------------------------------------------

    def flush(self, stream: H2Stream) -> None:
        """Send what ``stream`` has queued, as far as the flow-control windows allow."""
        if self.transport is None:
            return
        out = []
        pending = stream.pending
        finished = False
        while pending:
            kind, payload, end = pending[0]
            if kind == HEADERS:
                pending.popleft()
                out.append(header_frames(stream.id, payload, end, self.max_frame))
            else:
                allowed = min(self.peer_window, stream.window, self.max_frame)
                if allowed <= 0 and payload:
                    self.blocked[stream.id] = stream
                    break
                chunk = payload[:allowed]
                rest = payload[allowed:]
                self.peer_window -= len(chunk)
                stream.window -= len(chunk)
                if rest:
                    pending[0] = (kind, rest, end)
                else:
                    pending.popleft()
                out.append(
                    frame(DATA, wire.END_STREAM if end and not rest else 0, stream.id, chunk)
                )
            if end and not pending:
                finished = True
        if out:
            self._write(b"".join(out))
        if finished:
            self._close(stream)  # after its last frames are written: it may close the connection
        elif not pending and stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)

    def _unblock(self) -> None:
        for stream_id, stream in list(self.blocked.items()):
            if self.peer_window <= 0:
                return
            del self.blocked[stream_id]
            self.flush(stream)

    def _reset(self, stream_id: int, code: int) -> None:
        self._write(frame(wire.RST_STREAM, 0, stream_id, _U32.pack(code)))

    def reset(self, stream: H2Stream, code: int = wire.CANCEL) -> None:
        """End ``stream`` before its answer is complete."""
        if not stream.closed:
            self._reset(stream.id, code)
            self._close(stream, reset=True)

    def _close(self, stream: H2Stream, reset: bool = False) -> None:
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        stream.pending.clear()
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if reset:
            self.handler.on_reset(stream)
        else:
            self.finished += 1
        if self.going_away and not self.streams:
            self._write_out(close=True)

    def _fail(self, code: int, why: str) -> None:
        log.info("gRPC: closing a connection: %s", why)
        payload = _U32.pack(self.last_stream) + _U32.pack(code) + why.encode()[:200]
        self._write(frame(wire.GOAWAY, 0, 0, payload))
        self._write_out(close=True)

    def go_away(self) -> None:
        """Take no new stream; close once the open ones are answered (a server stopping)."""
        self.going_away = True
        payload = _U32.pack(self.last_stream) + _U32.pack(wire.NO_ERROR)
        self._write(frame(wire.GOAWAY, 0, 0, payload))
        if not self.streams:
            self._write_out(close=True)

    def _write(self, data: bytes) -> None:
        """Queue ``data`` for one write at the end of this turn of the loop: the answers of
        several calls that end together (a worker's batch) leave in one system call."""
        if self.transport is not None:
            if not self.out:
                self.loop.call_soon(self._write_out)
            self.out.append(data)

    def _write_out(self, close: bool = False) -> None:
        """Write what is queued; with ``close``, then close the connection."""
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()
        if close and self.transport is not None:
            self.transport.close()
