"""What every HTTP surface shares: ASGI types, errors, reading a body, writing an answer.

An error raised as ``HTTPError`` anywhere in a handler becomes one answer in the envelope of
the route's family: OpenAI's under ``/v1/``, Workers AI's under ``/ai/``, KServe v2's
elsewhere.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from omni_sdk.envelopes import ai_error_body, v2_error_body

__all__ = [
    "JSON",
    "accepted_encoding",
    "compress",
    "decompress",
    "ClientGone",
    "HTTPError",
    "Receive",
    "Scope",
    "Send",
    "error_body",
    "family_error",
    "read_body",
    "respond",
    "respond_json",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class HTTPError(Exception):
    """Answer this request with ``status`` and ``message``; ``param`` and ``code`` fill
    OpenAI's error fields on ``/v1`` routes."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []
        self.param = param
        self.code = code


class ClientGone(Exception):
    """The client disconnected before its request body arrived whole."""


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    """An error body in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {
        "message": message,
        "type": _OPENAI_TYPES.get(status, "server_error"),
        "param": param,
        "code": code,
    }
    return json.dumps({"error": error}).encode()


def error_body(ai: bool, status: int, message: str) -> bytes:
    """An error body in the envelope of Workers AI (``ai``) or KServe v2."""
    return ai_error_body(status, message) if ai else v2_error_body(message)


def family_error(path: str, error: HTTPError) -> bytes:
    """``error`` in the shape of the route's family: OpenAI, Workers AI or KServe v2."""
    if path.startswith("/v1/"):
        return openai_error(error.status, str(error), error.param, error.code)
    return error_body(path.startswith("/ai/"), error.status, str(error))


async def read_body(scope: Scope, receive: Receive, limit: int, model: str = "") -> bytes:
    """The whole request body, refused with 413 once it passes ``limit`` bytes; a body sent
    with ``Content-Encoding: gzip`` or ``deflate`` comes back decompressed (``limit`` holds
    for what it decompresses to, so a small bomb is refused as early as a large body).

    ``model``: the model the route is for, named in the 413 message when the route knows it.
    """
    encoding = None
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(limit, _subject(model))
        if name == b"content-encoding":
            encoding = value
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if message.get("more_body"):
        body = await _read_rest(receive, body, limit, _subject(model))
    elif len(body) > limit:
        raise _too_large(limit, _subject(model))
    if encoding is not None:
        text = encoding.decode("latin-1").strip().lower()
        return decompress(body, text, limit, _subject(model))
    return body


def _subject(model: str) -> str:
    return f"model '{model}'" if model else ""


def decompress(body: bytes, encoding: str, limit: int, subject: str = "") -> bytes:
    """``body`` decoded as ``Content-Encoding`` says; 415 for an encoding Omni does not read,
    400 for a body that is not what it claims, 413 past ``limit`` bytes decompressed."""
    if encoding in ("", "identity"):
        return body
    prefix = f"{subject}: " if subject else ""
    if encoding not in _DECODERS:
        raise HTTPError(
            415,
            f"{prefix}Content-Encoding {encoding!r} is not supported (send gzip, deflate or "
            "an uncompressed body)",
        )
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit or decoder.unconsumed_tail:
            raise _too_large(limit, subject)
        out += decoder.flush()
    except zlib.error as exc:
        raise HTTPError(400, f"{prefix}the body is not valid {encoding} data: {exc}") from None
    if not decoder.eof or len(out) > limit:
        if len(out) > limit:
            raise _too_large(limit, subject)
        raise HTTPError(400, f"{prefix}the {encoding} body ends before its data does")
    return out


def accepted_encoding(headers: list[tuple[bytes, bytes]]) -> str | None:
    """``gzip`` or ``deflate`` when the client's ``Accept-Encoding`` (in a request's
    ``headers``) asks for one."""
    for name, value in headers:
        if name == b"accept-encoding":
            offered = {part.split(b";")[0].strip().lower() for part in value.split(b",")}
            for encoding in (b"gzip", b"deflate"):
                if encoding in offered:
                    return encoding.decode()
    return None


def compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=1, mtime=0)
    return zlib.compress(body, 1)


async def _read_rest(receive: Receive, first: bytes, limit: int, subject: str) -> bytes:
    """The rest of a body that came in several messages, ``first`` the first of them."""
    chunks = [first]
    size = len(first)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, subject)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _too_large(limit: int, subject: str) -> HTTPError:
    prefix = f"{subject}: the" if subject else "the"
    return HTTPError(
        413,
        f"{prefix} request body is larger than the server's limit of {limit} bytes "
        "(server.max_body_size in omni.toml)",
    )


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, value: Any, status: int = 200) -> None:
    await respond(send, status, json.dumps(value).encode())
