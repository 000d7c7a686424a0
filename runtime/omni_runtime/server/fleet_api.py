"""The routes nodes of a fleet call on one another (API token, as inference):

- ``GET /fleet/capacity``: this node's load report (``fleet/report.py``);
- ``POST /fleet/call/{model}``: one request forwarded by a peer, in the worker's own terms:
  headers ``Omni-Kind`` (the wire kind), ``Omni-Route`` (the nodes it passed),
  ``Omni-Priority``, ``Omni-Reject-If-Busy``; the body as the worker takes it. The answer is
  the model's (status, ``Omni-Header-Length``, body), or, for a streamed request
  (``Omni-Stream``), frames of a type byte and a u32 length: ``C`` a chunk, ``R`` the final
  answer (u16 status, u32 header length, body). A model that is busy or unavailable here
  answers 429 or 503 with ``Omni-Refused``, so the forwarding node raises what a local call
  would have raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from omni_runtime.fleet.forward import FINAL, FRAME
from omni_runtime.scheduler import ModelBusy, ModelHandle, ModelUnavailable, Priority
from omni_runtime.server.http import (
    HTTPError,
    Receive,
    Scope,
    Send,
    read_body,
    respond,
    respond_json,
)
from omni_sdk.wire import V2_PREFIX, Kind

__all__ = ["FleetRoutes"]

_KINDS = {int(Kind.INFER_V2), int(Kind.RUN_JSON), int(Kind.RUN_STREAM), int(Kind.STREAM_V2)}


class FleetRoutes:
    def __init__(self, report: Callable[[], dict[str, Any]], max_body: int) -> None:
        self.report = report
        self.max_body = max_body

    async def capacity(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(send, self.report())

    async def call(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        started = time.perf_counter()
        fields = {k: v for k, v in scope["headers"] if k.startswith(b"omni-")}
        try:
            kind = int(fields.get(b"omni-kind", b""))
            priority = Priority(int(fields.get(b"omni-priority", b"0")))
        except ValueError:
            raise HTTPError(400, "a forwarded call needs Omni-Kind and Omni-Priority") from None
        if kind not in _KINDS:
            raise HTTPError(400, f"Omni-Kind {kind} is not a request kind")
        reject = fields.get(b"omni-reject-if-busy") == b"1"
        body = await read_body(scope, receive, self.max_body + 8, model.name)
        if kind in (Kind.INFER_V2, Kind.STREAM_V2) and (
            len(body) < V2_PREFIX.size or V2_PREFIX.unpack_from(body)[0] > len(body) - 4
        ):
            raise HTTPError(
                400,
                f"model '{model.name}': a forwarded v2 request starts with its u32 "
                "Inference-Header-Content-Length, no larger than the rest of the body",
            )
        if kind == Kind.RUN_STREAM or kind == Kind.STREAM_V2:
            await self._stream(send, model, kind, body, reject, priority, started)
            return
        try:
            status, header_length, answer = await model.call(
                kind, [body], reject, priority, started=started
            )
        except ModelBusy as exc:
            await respond(send, 429, str(exc).encode(), b"text/plain", [(b"omni-refused", b"busy")])
            return
        except ModelUnavailable as exc:
            extra = [(b"omni-refused", b"unavailable"), (b"retry-after", b"%d" % exc.retry_after)]
            await respond(send, 503, str(exc).encode(), b"text/plain", extra)
            return
        extra = [(b"omni-header-length", b"%d" % header_length)]
        await respond(send, status, answer, b"application/octet-stream", extra)

    async def _stream(
        self,
        send: Send,
        model: ModelHandle,
        kind: int,
        body: bytes,
        reject: bool,
        priority: Priority,
        started: float,
    ) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        call = asyncio.ensure_future(
            model.call(kind, [body], reject, priority, queue.put_nowait, started)
        )
        opened = False
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
                chunks = [getter.result()] if getter.done() else []
                if not getter.done():
                    getter.cancel()
                while not queue.empty():
                    chunks.append(queue.get_nowait())
                if chunks and not opened:
                    opened = True
                    await _open(send)
                for chunk in chunks:
                    await _frame(send, b"C", chunk)
                if call.done():
                    break
            try:
                status, header_length, answer = call.result()
            except ModelBusy as exc:
                if not opened:
                    extra = [(b"omni-refused", b"busy")]
                    await respond(send, 429, str(exc).encode(), b"text/plain", extra)
                    return
                status, header_length, answer = 429, 0, str(exc).encode()
            except ModelUnavailable as exc:
                if not opened:
                    extra = [(b"omni-refused", b"unavailable")]
                    await respond(send, 503, str(exc).encode(), b"text/plain", extra)
                    return
                status, header_length, answer = 503, 0, str(exc).encode()
            if not opened:
                await _open(send)
            final = FINAL.pack(status, header_length) + answer
            await send(
                {
                    "type": "http.response.body",
                    "body": FRAME.pack(b"R", len(final)) + final,
                }
            )
        finally:
            if not call.done():
                call.cancel()


async def _open(send: Send) -> None:
    headers = [(b"content-type", b"application/octet-stream"), (b"omni-stream", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def _frame(send: Send, tag: bytes, data: bytes) -> None:
    await send(
        {"type": "http.response.body", "body": FRAME.pack(tag, len(data)) + data, "more_body": True}
    )
