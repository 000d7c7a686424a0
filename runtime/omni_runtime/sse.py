"""Server-sent events over ASGI: what the streamed routes (/ai/run, /v1) share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["START", "disconnected", "event"]

START = {
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
