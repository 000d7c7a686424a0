"""Server-sent events over ASGI: what the streamed routes (/ai/run, /v1) share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from omni_runtime.workers.channel import ChunkSink
from omni_sdk.wire import Kind

if TYPE_CHECKING:
    from omni_runtime.scheduler import ModelHandle

__all__ = ["START", "StreamedCall", "disconnected", "event"]

START: dict[str, Any] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),  # no buffering in a proxy in front
    ],
}


def event(data: bytes) -> dict[str, Any]:
    """One piece of the stream, more to follow."""
    return {"type": "http.response.body", "body": data, "more_body": True}


async def disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Returns once the client has closed the connection (its body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamedCall:
    """One streamed request to a model: its chunks as the engine yields them, then its end.

    ``async for chunk in call`` ends when the worker's answer is complete (then ``result()``
    gives it, or raises ModelBusy / ModelUnavailable) or when the client went away
    (``client_gone``). ``close()`` in a ``finally`` stops the engine's generator whatever ended
    the handler.
    """

    def __init__(
        self,
        model: ModelHandle,
        body: bytes,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        reject_if_busy: bool = False,
        started: float | None = None,
    ) -> None:
        # Bounded: a client that reads slowly holds its worker back, not the runtime's memory.
        self._chunks = ChunkSink()
        self._call = asyncio.ensure_future(
            model.call(
                Kind.RUN_STREAM, [body], reject_if_busy, on_chunk=self._chunks, started=started
            )
        )
        self._gone = asyncio.ensure_future(disconnected(receive))
        self.client_gone = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            getter = asyncio.ensure_future(self._chunks.get())
            await asyncio.wait(
                {getter, self._call, self._gone}, return_when=asyncio.FIRST_COMPLETED
            )
            if self._gone.done():
                getter.cancel()
                self.client_gone = True
                return
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
            while not self._chunks.empty():
                yield self._chunks.take()
            if self._call.done():
                return

    def result(self) -> tuple[int, int, bytes]:
        """The worker's final answer: (status, header length, body)."""
        return self._call.result()

    def close(self) -> None:
        self._gone.cancel()
        if not self._call.done():
            self._call.cancel()
