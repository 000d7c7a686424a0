"""The runtime's end of a worker's socket: frames out, futures resolved by request id."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from omni_runtime.scheduler.backend import Response, WorkerGone
from omni_runtime.scheduler.stats import ComputeStats
from omni_runtime.workers.busy_poll import BusyPoll
from omni_sdk.envelopes import ai_error_body, v2_error_body
from omni_sdk.wire import (
    FLAG_FD,
    HEADER,
    RESPONSE_PREFIX,
    FrameReader,
    Kind,
    PayloadError,
    Payloads,
    ProtocolError,
    encode_frame,
    payload,
    receive_fd,
)

__all__ = ["ChunkSink", "WorkerChannel"]

log = logging.getLogger(__name__)

STREAM_BUFFER = 4 << 20  # bytes of one stream's chunks that may wait for its client
STREAM_STALL = 60.0  # seconds a stream may hold its worker back before it is ended


class ChunkSink:
    """A streamed request's chunks on their way to its client, ``limit`` bytes at most.

    Past the limit the worker's channel stops reading, so the worker's writes wait, and with
    them its engine's generator, until the client has taken half of what waits. A client that
    takes nothing for ``stall_timeout`` seconds loses its stream (the worker is told to stop).
    """

    def __init__(self, limit: int = STREAM_BUFFER, stall_timeout: float = STREAM_STALL) -> None:
        self.limit = limit
        self.stall_timeout = stall_timeout
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ready = asyncio.Event()
        self._release: Callable[[], None] | None = None

    def __call__(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._ready.set()

    @property
    def full(self) -> bool:
        return self._size >= self.limit

    @property
    def held(self) -> bool:
        return self._release is not None

    def hold(self, release: Callable[[], None]) -> None:
        """The channel stopped reading for this stream; ``release`` lets it go on."""
        self._release = release

    def empty(self) -> bool:
        return not self._chunks

    def take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._release is not None and self._size <= self.limit // 2:
            release, self._release = self._release, None
            release()
        return chunk

    async def get(self) -> bytes:
        while not self._chunks:
            self._ready.clear()
            await self._ready.wait()
        return self.take()


def _discard(flags: int, fds: socket.socket | None) -> None:
    """Take a frame's memfd off the side channel unread, so the next frame gets its own."""
    if flags & FLAG_FD and fds is not None:
        with contextlib.suppress(ProtocolError):
            os.close(receive_fd(fds))


class WorkerChannel(asyncio.Protocol):
    def __init__(
        self,
        label: str,
        payloads: Payloads,
        fds: socket.socket | None,
        busy_poll: float = 0.0,
        worker_polls: bool = True,
    ) -> None:
        """``busy_poll``: server.busy_poll; ``worker_polls``: whether the worker may be told to
        poll (FLAG_POLL): not where its CPU quota is under a core, which polling would use up."""
        self.label = label
        self.compute: ComputeStats | None = None  # where its answers' compute times add up
        self.shm = payloads
        self.fds = fds  # where the worker's large payloads' memfds arrive
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[tuple[int, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = FrameReader()
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._streams: dict[int, Callable[[bytes], None]] = {}
        self._next_id = 0
        self._loop = asyncio.get_running_loop()
        self._busy = BusyPoll.of(self._loop, busy_poll)
        self._worker_polls = worker_polls
        self._out: list[bytes] = []  # request frames to write at the end of this turn
        self.gone_reason = ""
        # Since when the worker owes an answer (a response or a PONG) without having said
        # anything; None while it owes nothing. The runtime's watchdog reads this.
        self.waiting_since: float | None = None
        self._ping_outstanding = False
        self._roundtrips: dict[int, asyncio.Future[None]] = {}  # PINGs awaited, by id
        # Streams whose client is behind: while any holds it, nothing more is read.
        self._holds: dict[int, asyncio.TimerHandle] = {}

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            for kind, flags, request_id, body in self._reader.feed(data):
                if kind == Kind.RESPONSE:
                    future = self._pending.pop(request_id, None)
                    self._streams.pop(request_id, None)
                    self._release(request_id)
                    if future is None or future.done():
                        _discard(flags, self.fds)  # its caller is gone: never read
                        continue
                    try:
                        raw = memoryview(payload(flags, body, self.fds))
                        if flags & FLAG_FD:
                            log.debug(
                                "%s: answer %d came in a memfd (%d bytes)",
                                self.label, request_id, len(raw),
                            )  # fmt: skip
                        status, header_length, ran, took_in, took, took_out = (
                            RESPONSE_PREFIX.unpack_from(raw)
                        )
                    except (PayloadError, struct.error) as exc:  # that answer alone is lost
                        message = f"{self.label}: its answer could not be read: {exc}"
                        future.set_result((502, 0, json.dumps({"error": message}).encode()))
                        continue
                    if ran and status == 200 and self.compute is not None:
                        self.compute.add(ran, took_in, took, took_out)
                    future.set_result((status, header_length, bytes(raw[RESPONSE_PREFIX.size :])))
                elif kind == Kind.CHUNK:
                    on_chunk = self._streams.get(request_id)
                    if on_chunk is None:
                        _discard(flags, self.fds)
                        continue
                    try:
                        on_chunk(bytes(payload(flags, body, self.fds)))
                    except PayloadError:
                        continue  # a chunk that cannot be read is dropped; the stream goes on
                    if isinstance(on_chunk, ChunkSink) and on_chunk.full and not on_chunk.held:
                        self._hold(request_id, on_chunk)
                elif kind == Kind.PONG:
                    waiter = self._roundtrips.pop(request_id, None)
                    if waiter is None:
                        self._ping_outstanding = False
                    elif not waiter.done():
                        waiter.set_result(None)
                elif kind in (Kind.HELLO, Kind.LOAD_FAILED) and not self.hello.done():
                    self.hello.set_result((kind, json.loads(body)))
        except (ProtocolError, OSError, ValueError) as exc:
            self.gone_reason = f"{self.label} sent an unreadable message: {exc}"
            if self.transport is not None:
                self.transport.close()
        owes = self._pending or self._ping_outstanding
        self.waiting_since = time.monotonic() if owes else None

    def _hold(self, request_id: int, sink: ChunkSink) -> None:
        """Stop reading until the stream's client has caught up (or stalled for too long)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._holds:
            self.transport.pause_reading()
        self._holds[request_id] = self._loop.call_later(
            sink.stall_timeout, self._stalled, request_id
        )
        sink.hold(lambda: self._release(request_id))

    def _release(self, request_id: int) -> None:
        timer = self._holds.pop(request_id, None)
        if timer is None:
            return
        timer.cancel()
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _stalled(self, request_id: int) -> None:
        """A stream's client took nothing for its stall timeout: end that stream alone."""
        self._holds.pop(request_id, None)
        self._streams.pop(request_id, None)
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            message = f"{self.label}: the stream's client stopped reading; the stream was ended"
            future.set_result((504, 0, ai_error_body(504, message)))
        if self.transport is not None and not self.transport.is_closing():
            self._write(encode_frame(Kind.CANCEL, request_id))
            if not self._holds:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._holds.values():
            timer.cancel()
        self._holds.clear()
        reason = self.gone_reason or f"{self.label}'s worker exited"
        error = WorkerGone(reason)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for waiter in self._roundtrips.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._roundtrips.clear()
        if not self.hello.done():
            self.hello.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def request(
        self,
        kind: int,
        parts: list[bytes] | tuple[bytes, ...],
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> asyncio.Future[Response]:
        """Send one request; the future resolves with its RESPONSE.

        A streamed request (RUN_STREAM) passes each CHUNK to ``on_chunk`` as it arrives. A
        caller that goes away calls ``abandon``: the request stays pending until answered.
        """
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Response] = self._loop.create_future()
        transport = self.transport
        if transport is None or transport.is_closing():
            future.set_exception(WorkerGone(f"{self.label}'s worker is not connected"))
            return future
        flags = self._busy.flags(self) if self._worker_polls else 0
        self._busy.sent(future, flags)
        try:
            frame = self.shm.frame(kind, request_id, parts, flags)
        except OSError as exc:  # memory is short: this request fails, nothing else
            message = f"{self.label}: the request could not be handed to its worker: {exc}"
            body = v2_error_body(message) if kind == Kind.INFER_V2 else ai_error_body(503, message)
            future.set_result((503, 0, body))
            return future
        if HEADER.unpack_from(frame)[3] & FLAG_FD:
            size = sum(len(p) for p in parts)
            log.debug("%s: request %d went in a memfd (%d bytes)", self.label, request_id, size)
        idle = not self._pending  # the worker owes nothing: it waits for this request
        self._pending[request_id] = future
        if on_chunk is not None:
            self._streams[request_id] = on_chunk
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        if idle and not self._out:
            transport.write(frame)
        else:
            self._queue(frame)
        return future

    def _queue(self, frame: bytes) -> None:
        """Requests sent in one turn of the loop to a worker already at work leave in one
        write: under load, one system call and one wake-up of the worker for several
        requests. (A request to an idle worker leaves at once: nothing would be gained by
        holding it back.)"""
        if self._out:
            self._out.append(frame)
            return
        self._out = [frame]
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, frame: bytes) -> None:
        """A control frame: at once, after the requests queued before it."""
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def abandon(self, future: asyncio.Future[Response]) -> asyncio.Future[Response]:
        """Tell the worker to stop a request whose caller left (CANCEL).

        The worker still owes its answer (it may be running it): the request stays pending on
        a new future, which resolves when that answer arrives or the worker goes. Its chunks,
        if it streams, are dropped.
        """
        request_id = next((i for i, f in self._pending.items() if f is future), None)
        if request_id is None:
            return future  # already answered
        self._streams.pop(request_id, None)
        self._release(request_id)  # nobody reads its chunks now: no reason to hold back
        settled: asyncio.Future[Response] = self._loop.create_future()
        self._pending[request_id] = settled
        self._write(encode_frame(Kind.CANCEL, request_id))
        return settled

    def ping(self) -> None:
        """Ask an idle worker for a PONG, so a worker hung while idle is noticed too."""
        if self._ping_outstanding or self._pending:
            return
        self._ping_outstanding = True
        self.waiting_since = time.monotonic()
        self.send(Kind.PING)

    def roundtrip(self) -> asyncio.Future[None]:
        """A PING whose PONG resolves the future: the worker has handled every frame before it."""
        self._next_id += 1
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._roundtrips[self._next_id] = waiter
        if self.transport is None or self.transport.is_closing():
            waiter.set_exception(WorkerGone(f"{self.label}'s worker is not connected"))
        else:
            self._write(encode_frame(Kind.PING, self._next_id))
        return waiter

    def silent_for(self, now: float) -> float:
        """Seconds the worker has owed an answer without saying anything (while the runtime
        holds it back for a slow client, it is not the worker that is silent)."""
        if self.waiting_since is None or self._holds:
            return 0.0
        return now - self.waiting_since

    def send(self, kind: int, body: bytes = b"") -> None:
        """A control frame (SHUTDOWN, PING, PREFETCH): always small, always inline."""
        self._write(encode_frame(kind, 0, body))
