"""HTTP/1.1's hot path (server/hot_path.py), over real sockets to a real uvicorn server: which
requests the connection answers itself and which go through ASGI, and that a hot answer keeps
its place among pipelined requests, keep-alive, ``Connection: close`` and disconnects.

The application is a small one of this test's own, with the two methods the hot path asks of
``OmniApp`` (``tests/e2e/test_hot_path.py`` checks Omni's own answers both ways)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn

from omni_runtime.server.connection import limited_protocol

MAX_BODY = 1 << 20


class App:
    """Answers ``/hot/...`` on the hot path ("hot:" and the body) and everything through
    ASGI ("asgi:" and the body); ``/hot/slow`` takes 0.3 s; each records what it answered."""

    def __init__(self) -> None:
        self.asgi: list[str] = []
        self.hot: list[str] = []
        self.finished: list[str] = []  # hot replies that ran to their end
        self.tasks: list[object] = []  # asyncio.current_task() as each hot reply began

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.asgi.append(scope["path"])
        content = b"asgi:" + body
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(content))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def hot_route(self, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        return "model" if path.startswith("/hot/") else None

    async def hot_reply(
        self, path: str, model: Any, headers: list[tuple[bytes, bytes]], body: bytes,
        started: float,
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:  # fmt: skip
        self.hot.append(path)
        self.tasks.append(asyncio.current_task())
        if path == "/hot/slow":
            await asyncio.sleep(0.3)
        self.finished.append(path)
        return 200, b"hot:" + body, b"text/plain", [(b"x-model", model.encode())]


@asynccontextmanager
async def serving(app: App, keep_alive: int = 5) -> AsyncIterator[int]:
    """uvicorn serving ``app`` with the runtime's protocol, as ``omni-runtime serve`` runs it;
    yields its port."""
    config = uvicorn.Config(
        app,
        http=limited_protocol(8192, 5.0, 100, MAX_BODY),
        lifespan="off",
        log_level="warning",
        proxy_headers=False,
        timeout_keep_alive=keep_alive,
    )
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


Answer = tuple[bytes, dict[str, str], bytes]


async def _exchange(port: int, data: bytes, answers: int) -> list[Answer]:
    """Send ``data`` on a new connection and read ``answers`` answers: (status line, headers,
    body) each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return [await _answer(reader) for _ in range(answers)]
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100 "):  # (to Expect: 100-continue)
        head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, value = line.decode().split(":", 1)
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def _post(path: str, body: bytes = b"x", extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_an_infer_request_is_answered_by_the_connection_with_the_same_headers() -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers = []
            for body in (b"one", b"two"):  # one connection, kept alive
                writer.write(_post("/hot/m", body))
                answers.append(await _answer(reader))
            writer.close()
        assert app.hot == ["/hot/m", "/hot/m"] and app.asgi == []
        for (status, headers, _), body in zip(answers, (b"hot:one", b"hot:two"), strict=True):
            assert status == b"HTTP/1.1 200 OK"
            assert headers["content-type"] == "text/plain"
            assert headers["content-length"] == str(len(body))
            assert headers["x-model"] == "model"
            assert "date" in headers and "connection" not in headers  # kept alive
        assert [body for _, _, body in answers] == [b"hot:one", b"hot:two"]

    _run(scenario)


def test_the_reply_begins_within_the_read_that_completed_the_request() -> None:
    """Not a turn of the loop later, in a task (server/eager.py): on Omni's hot path, the
    request is on its way to its worker before the connection's read returns. A reply that
    waits goes on in a task all the same."""

    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            [(_, _, fast)] = await _exchange(port, _post("/hot/m", b"1"), 1)
            [(_, _, slow)] = await _exchange(port, _post("/hot/slow", b"2"), 1)
        assert (fast, slow) == (b"hot:1", b"hot:2")
        assert app.tasks == [None, None]  # both began inside data_received
        assert app.finished == ["/hot/m", "/hot/slow"]

    _run(scenario)


@pytest.mark.parametrize(
    "request_bytes",
    [
        _post("/hot/m?x=1"),  # a query
        _post("/hot/%6D"),  # an escape
        _post("/hot/m", b"x", "Content-Encoding: gzip\r\n"),
        _post("/hot/m", b"x", "Expect: 100-continue\r\n"),
        _post("/hot/m", version="1.0"),
        _post("/hot/m", b"x" * (65 << 10)),  # larger than the hot path takes
        b"POST /hot/m HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        b"GET /hot/m HTTP/1.1\r\nHost: t\r\n\r\n",
        _post("/other"),  # not a hot route
    ],
    ids=["query", "escape", "gzip", "expect", "http1.0", "large", "chunked", "get", "route"],
)
def test_what_the_hot_path_does_not_take_goes_through_asgi(request_bytes: bytes) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            [(status, _, body)] = await _exchange(port, request_bytes, 1)
        assert status.startswith(b"HTTP/1.1 200") and body.startswith(b"asgi:")
        assert app.hot == [] and len(app.asgi) == 1

    _run(scenario)


def test_pipelined_requests_are_answered_in_order_whichever_way_each_goes() -> None:
    """A request that comes while an earlier one is unanswered goes through ASGI, which
    queues it (uvicorn's pipelining); the first, alone, goes the hot way."""

    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            data = _post("/hot/slow", b"1") + _post("/other", b"2") + _post("/hot/m", b"3")
            answers = await _exchange(port, data, 3)
            assert [body for _, _, body in answers] == [b"hot:1", b"asgi:2", b"asgi:3"]
            answers = await _exchange(port, _post("/other", b"4") + _post("/hot/slow", b"5"), 2)
            assert [body for _, _, body in answers] == [b"asgi:4", b"asgi:5"]

    _run(scenario)


def test_connection_close_is_answered_then_closed() -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post("/hot/m", b"bye", "Connection: close\r\n"))
            _, headers, body = await _answer(reader)
            assert (body, headers["connection"]) == (b"hot:bye", "close")
            assert await reader.read() == b""  # the server closed it
            writer.close()
        assert app.hot == ["/hot/m"]

    _run(scenario)


def test_a_client_gone_before_its_answer_costs_nothing_else() -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post("/hot/slow", b"gone"))
            await asyncio.sleep(0.05)
            writer.close()  # before the answer
            await asyncio.sleep(0.5)
            assert app.finished == ["/hot/slow"]  # its reply ran to its end, unwritten
            [(_, _, body)] = await _exchange(port, _post("/hot/m", b"next"), 1)
            assert body == b"hot:next"

    _run(scenario)


def test_an_idle_connection_is_closed_after_the_keep_alive_and_a_busy_one_is_not() -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app, keep_alive=1) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for n in range(5):  # 2 s of requests, never 1 s apart
                writer.write(_post("/hot/m", b"%d" % n))
                assert (await _answer(reader))[2] == b"hot:%d" % n
                await asyncio.sleep(0.4)
            closed = await asyncio.wait_for(reader.read(), 3)  # then idle: closed
            assert closed == b""
            writer.close()

    _run(scenario)
