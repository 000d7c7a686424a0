"""HTTP/1.1's hot path: a small infer request answered by its connection, below ASGI.

Through ASGI, uvicorn turns each request into a scope, a task running the application, and
two ``send`` messages whose headers it checks one by one before it writes them. For the
infer route of a model served here, that machinery cost as much of the runtime's CPU as the
trip to the worker (docs/benchmarks.md). So the connection (``connection.py``) answers these
requests itself, with the application's own code: ``OmniApp.hot_route`` says whether a
request may go this way, ``OmniApp.hot_reply`` gives its reply (errors included), and the
reply leaves in one write. ``answer`` starts eagerly (``eager.py``): the request goes to its
worker within the read that completed it.

A request goes this way when every one of these holds, and through ASGI otherwise:

- ``POST`` over HTTP/1.1, no upgrade, and no earlier request on the connection unanswered;
- the path is plain ASCII (no query, no ``%`` escapes) and names the infer route of a model
  served here, outside a fleet and a rollout's split (``OmniApp.hot_route``);
- a Content-Length up to 64 KiB and under ``server.max_body_size``, and no Content-Encoding,
  Transfer-Encoding or Expect header;
- the bearer token, where the route needs one, is good.

Its answer is the one the ASGI path gives: the same status, headers (uvicorn's ``date``
first) and body. As the connection's ``cycle``, the request takes part in pipelining,
keep-alive, disconnects, limits and shutdown as uvicorn's own cycles do.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Protocol

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from omni_runtime.scheduler import ModelHandle

if TYPE_CHECKING:
    from omni_runtime.server.connection import LimitedHttpToolsProtocol
    from omni_runtime.server.kserve import Reply

__all__ = ["HotApp", "HotCycle", "hot_cycle"]

_PLAIN_PATH = re.compile(rb"/[\x21-\x22\x24\x26-\x3e\x40-\x7e]*\Z")  # no %, ?, # or spaces
_NOT_HOT = frozenset((b"content-encoding", b"transfer-encoding", b"expect", b"upgrade"))


class HotApp(Protocol):
    """What the hot path needs of the application (``OmniApp``)."""

    def hot_route(self, path: str, headers: list[tuple[bytes, bytes]]) -> ModelHandle | None:
        """The model whose infer route ``POST path`` is, where it may go the hot way."""

    async def hot_reply(
        self,
        path: str,
        model: ModelHandle,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        started: float,
    ) -> Reply:
        """The reply the ASGI path would give to that request, errors included."""  # fmt: skip


class _NoWaiter:
    """A hot cycle's ``message_event``: nothing waits on it, as its task starts once the
    body is in; uvicorn's protocol sets it all the same."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_WAITER = _NoWaiter()


class HotCycle:
    """One request on the hot path, as its connection's ``cycle``: uvicorn's protocol fills
    its body and marks it complete or disconnected, as it does a RequestResponseCycle's;
    ``answer`` replies with one write."""

    __slots__ = (
        "body",
        "disconnected",
        "headers",
        "keep_alive",
        "model",
        "more_body",
        "path",
        "protocol",
        "response_complete",
        "response_started",
    )
    message_event = _NO_WAITER

    def __init__(self, protocol: LimitedHttpToolsProtocol, path: str, model: ModelHandle) -> None:
        self.protocol = protocol
        self.path = path
        self.model = model
        self.headers = protocol.headers
        self.body = bytearray()
        self.more_body = True
        self.keep_alive = protocol.parser.should_keep_alive()  # shutdown() clears it
        self.disconnected = self.response_started = self.response_complete = False

    async def answer(self, app: HotApp) -> None:
        """Ask ``app`` for the reply to the complete request, and write it."""
        started = time.perf_counter()
        protocol = self.protocol
        try:
            body = bytes(self.body)
            reply = await app.hot_reply(self.path, self.model, self.headers, body, started)
            if protocol.flow.write_paused and not self.disconnected:
                await protocol.flow.drain()  # the client reads slowly: no more piles up here
        except Exception:  # hot_reply answers errors itself; this would be a bug here
            protocol.logger.exception("POST %s failed", self.path)
            protocol.transport.close()
            return
        if self.disconnected:
            return  # nobody is left to answer (the model's answer was counted all the same)
        status, content, content_type, extra = reply
        out = [STATUS_LINE[status]]
        for name, value in protocol.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        out += (b"content-type: ", content_type, b"\r\ncontent-length: %d\r\n" % len(content))
        for name, value in extra:
            out += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", content)
        self.response_started = self.response_complete = True
        protocol.transport.write(b"".join(out))
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()


def hot_cycle(protocol: LimitedHttpToolsProtocol, app: HotApp, max_body: int) -> HotCycle | None:
    """The hot cycle of the request whose head ``protocol`` has just parsed, or None where
    it goes through ASGI (see the module's docstring)."""
    parser = protocol.parser
    url = protocol.url
    if (
        parser.get_method() != b"POST"
        or parser.get_http_version() != "1.1"
        or parser.should_upgrade()
        or (protocol.cycle is not None and not protocol.cycle.response_complete)
        or protocol.root_path
        or not _PLAIN_PATH.match(url)
    ):
        return None
    length = -1
    for name, value in protocol.headers:
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name in _NOT_HOT:
            return None
    if length < 0 or length > HIGH_WATER_LIMIT or length > max_body:
        return None
    path = url.decode("ascii")
    model = app.hot_route(path, protocol.headers)
    return None if model is None else HotCycle(protocol, path, model)
