"""Connection limits that an ASGI application cannot enforce: header size, body time, count.

uvicorn's httptools protocol buffers a header of any size and waits for a body forever. This
subclass refuses a request line and headers larger than ``server.max_header_size`` with 431,
and a request not received whole within ``server.body_timeout`` of its first byte with 408;
both close the connection. A request that arrives in one read (most do) arms no timer.

At most ``server.max_connections`` connections stay open: a new one past the limit closes the
connection idle the longest (connected or kept alive with no request under way), or itself
when every other one is busy, so idle connections cannot use up the runtime's descriptors.

A small infer request is answered by the connection itself, below ASGI (``hot_path.py``); the
keep-alive timer is one per connection, looked at when it fires, rather than one set and
cancelled per request.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from omni_runtime.server.eager import start_eagerly
from omni_runtime.server.hot_path import HotApp, HotCycle, hot_cycle
from omni_sdk.envelopes import ai_error_body, v2_error_body

__all__ = ["limited_protocol"]

_END_OF_HEAD = b"\r\n\r\n"


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_header_size = 16 << 10
    body_timeout = 30.0
    max_connections = 1000
    max_body_size = 64 << 20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The application, where it answers small infer requests below ASGI (hot_path.py).
        self._hot_app = cast(HotApp, self.app) if hasattr(self.app, "hot_route") else None
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0
        self._head_start = b""  # the first bytes of the head: the method and path
        self._head_tail = b""  # the last bytes of the head so far, to find its end across reads
        self._receiving = False  # a request has begun and is not yet whole
        self._deadline: asyncio.TimerHandle | None = None
        self._parsed_head = 0  # the current request's URL and headers, as parsed
        self._head_too_large = False
        self._deferred: tuple[int, str] | None = None  # a refusal waiting for an answer
        self._idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._arm()  # a connection that never sends a byte is closed too
        if len(self.server_state.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        """Past the limit: close the connection idle the longest, or this new one."""
        idle = [
            c
            for c in self.server_state.connections
            if isinstance(c, LimitedHttpToolsProtocol)
            and c is not self
            and c._idle()
            and not c.transport.is_closing()
        ]
        oldest = min(idle, key=lambda c: c._idle_since, default=None)
        (oldest or self).transport.close()

    def _idle(self) -> bool:
        return not self._receiving and (self.cycle is None or self.cycle.response_complete)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if len(self._head_start) < 64:
                self._head_start = (self._head_start + data[:64]).lstrip(b"\r\n")
            seen = self._head_tail + data
            end = seen.find(_END_OF_HEAD)
            if end < 0:
                self._head_bytes += len(data)
            else:
                self._head_bytes += end + len(_END_OF_HEAD) - len(self._head_tail)
            self._head_tail = seen[-3:]
            if self._head_bytes > self.max_header_size:
                self._refuse(431, self._too_large_message())
                return
        super().data_received(data)
        if self._receiving and self._deadline is None and not self.transport.is_closing():
            self._arm()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._idle_since = self.loop.time()
        self._receiving = True
        self._parsed_head = 0

    # The head as the parser sees it, too: a request whose head arrives in the same read as
    # the end of the one before it (pipelined, or after an early 413) is counted here.
    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._parsed_head += size
        if self._parsed_head > self.max_header_size:
            self._head_too_large = True
            raise _HeadTooLarge  # stops the parser; uvicorn then calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(431, self._too_large_message())
            return
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._hot_app is not None and not self.transport.is_closing():
            hot = hot_cycle(self, self._hot_app, self.max_body_size)
            if hot is not None:
                self.cycle = hot  # type: ignore[assignment]  # (answered in on_message_complete)
                return
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = _HeadHeld(self.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle: Any = self.cycle
        if type(cycle) is HotCycle and not cycle.response_complete:
            assert self._hot_app is not None
            # Sent to its worker now, not a turn of the loop later (eager.py).
            task = start_eagerly(self.loop, cycle.answer(self._hot_app))
            if task is not None:
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
        self._receiving = False
        self._in_head = True
        self._head_bytes = 0
        self._head_start = self._head_tail = b""
        self._disarm()

    # -- the deadline --------------------------------------------------------------------

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.body_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._receiving:
            if self.cycle is None:
                self.transport.close()  # connected, and never sent a request
            return
        if self.flow.read_paused or (
            self._in_head and self.cycle is not None and not self.cycle.response_complete
        ):
            self._arm()  # the server is not reading yet (an earlier request is in flight)
            return
        self._refuse(
            408,
            f"the request was not received within {self.body_timeout:g}s (server.body_timeout)",
        )

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` in the route family's error shape, then close the connection."""
        self._disarm()
        cycle = self.cycle  # in the head, the previous request's; else this one's
        if self._in_head and cycle is not None and not cycle.response_complete:
            # A pipelined request: the one before it is answered first, then this refusal.
            self._deferred = (status, message)
            self.transport.pause_reading()
            return
        if cycle is not None and not self._in_head and cycle.response_started:
            self.transport.close()  # an answer is already on its way; it cannot get another
            return
        if cycle is not None and not self._in_head:  # the app waits for a body that won't come
            cycle.disconnected = True
            cycle.message_event.set()
        ai = self._path().startswith(b"/ai/")
        body = ai_error_body(status, message) if ai else v2_error_body(message)
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        if self._deferred is not None and not self.transport.is_closing():
            status, message = self._deferred
            self._deferred = None
            self.server_state.total_requests += 1
            self._refuse(status, message)
            return
        self._idle_since = self.loop.time()
        # uvicorn's, but for its keep-alive timer: one per connection (_keep_alive_expired),
        # not one set and cancelled per request.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self.timeout_keep_alive_task is None:
            self._keep_alive_in(self.timeout_keep_alive)

    def _unset_keepalive_if_required(self) -> None:
        pass  # (uvicorn's, on each read) the timer stays: _keep_alive_expired looks again

    def _keep_alive_in(self, seconds: float) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(seconds, self._keep_alive_expired)

    def _keep_alive_expired(self) -> None:
        """Close the connection if it has been idle ``timeout_keep_alive`` since its last
        answer; where it is busy, its next answer arms the timer again."""
        self.timeout_keep_alive_task = None
        if self.transport.is_closing() or not self._idle():
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._keep_alive_in(left)
        else:
            self.transport.close()

    def _too_large_message(self) -> str:
        return (
            "the request line and headers are larger than the server's limit of "
            f"{self.max_header_size} bytes (server.max_header_size)"
        )

    def _path(self) -> bytes:
        if not self._in_head:
            return self.url
        parts = self._head_start.split(b" ", 2)
        return parts[1] if len(parts) > 1 else b""


class _HeadHeld:
    """A request's view of its connection's transport that holds the answer's head (uvicorn
    writes the status line and headers, then the body, each with a write of its own) until
    the body follows, so that both go out in one send: a system call and a TCP segment fewer
    per answer. A head whose body does not follow in the same pass of the event loop (a
    stream's first event still to come) is sent on its own at the end of that pass."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def limited_protocol(
    max_header_size: int,
    body_timeout: float,
    max_connections: int = 1000,
    max_body_size: int = 64 << 20,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits (``uvicorn.Config(http=...)``);
    ``max_body_size``: the largest body the hot path takes (hot_path.py)."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_header_size": max_header_size,
            "body_timeout": body_timeout,
            "max_connections": max_connections,
            "max_body_size": max_body_size,
        },
    )
