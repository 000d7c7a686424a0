"""Forwarding one request to a peer: the client side of ``POST /fleet/call/{model}``.

The request travels in the worker's own terms (the wire kind, the body as the worker takes
it), and the answer comes back as the worker wrote it, so a forwarded request costs the peer
no decoding the first node did not do. A streamed request's answer is a sequence of frames
(``FRAME``): ``C`` a chunk, ``R`` the final answer (``FINAL``: status, header length, then the
body). A peer that cannot take the model answers with ``Omni-Refused`` (busy, unavailable), and
the forwarding node raises what a local call would have raised.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import quote

import aiohttp

from omni_runtime.fleet.peers import PeerReport
from omni_runtime.scheduler import ModelBusy, ModelUnavailable, Priority
from omni_runtime.scheduler.trace import Trace
from omni_sdk.wire import Kind

__all__ = ["FINAL", "FRAME", "Forwarder", "PeerUnreachable"]

WATCH_SECONDS = 0.25  # how often a forward waiting for its answer checks the peer still reports
FRAME = struct.Struct("<cI")  # a type byte and the length of the data that follows
FINAL = struct.Struct("<HI")  # the final frame's data starts with status, header length
Response = tuple[int, int, bytes]


class PeerUnreachable(Exception):
    """The peer refused the connection or went away before its answer began."""


class Forwarder:
    """Requests to peers, on aiohttp's client: kept-alive connections, and a small CPU cost
    per request (a forward should cost the forwarding node little more than a local call)."""

    def __init__(self, me: str, headers: Mapping[str, str]) -> None:
        self.me = me
        self.headers = dict(headers)
        self.outstanding: dict[str, int] = {}  # requests sent to each peer, not answered yet
        # (node, model) -> requests sent and not answered: where a cold start is under way
        self.starting: dict[tuple[str, str], int] = {}
        self._session: aiohttp.ClientSession | None = None  # made on the running loop

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=1.0),
                headers=self.headers,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        peer: PeerReport,
        name: str,
        kind: int,
        parts: list[bytes],
        reject_if_busy: bool,
        priority: Priority,
        on_chunk: Callable[[bytes], None] | None,
        trace: Trace,
        alive: Callable[[], bool] = lambda: True,
    ) -> Response:
        """One request to ``peer``'s ``/fleet/call`` route; its answer, as a local call's.
        ``alive()`` says whether the peer still reports: one whose reports stopped before
        its answer began is given up on (it dropped off the network without a word).

        Raises ``PeerUnreachable`` when another node may be tried."""
        url = f"{peer.node.url}/fleet/call/{quote(name, safe='/@')}"
        headers = {
            "omni-kind": str(kind),
            "omni-route": ",".join([*trace.nodes, self.me]),
            "omni-priority": str(int(priority)),
            "omni-reject-if-busy": "1" if reject_if_busy else "0",
        }
        body = b"".join(parts)
        node = peer.node.name
        self.outstanding[node] = self.outstanding.get(node, 0) + 1
        self.starting[(node, name)] = self.starting.get((node, name), 0) + 1
        try:
            return await self._send(url, headers, body, kind, on_chunk, trace, peer, name, alive)
        finally:
            self.outstanding[node] -= 1
            left = self.starting.pop((node, name)) - 1
            if left:
                self.starting[(node, name)] = left

    async def _send(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        kind: int,
        on_chunk: Callable[[bytes], None] | None,
        trace: Trace,
        peer: PeerReport,
        name: str,
        alive: Callable[[], bool],
    ) -> Response:
        if kind == Kind.RUN_STREAM or kind == Kind.STREAM_V2:
            return await self._stream(url, headers, body, on_chunk, trace, peer, alive)
        try:
            response = await _answer_begun(
                self._client().post(url, data=body, headers=headers), alive
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            # refused, or gone before the answer began: another node may take it
            raise PeerUnreachable(str(exc) or type(exc).__name__) from None
        async with response:
            try:
                content = await response.read()
            except aiohttp.ClientError as exc:  # its answer began: it ran; not retried
                raise ModelUnavailable(
                    f"node {peer.node.name} went away answering: {exc}"
                ) from None
        _raise_refusal(response.status, response.headers, content, name)
        _note(trace, response.headers, peer)
        length = int(response.headers.get("omni-header-length", "0"))
        return response.status, length, content

    async def _stream(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        on_chunk: Callable[[bytes], None] | None,
        trace: Trace,
        peer: PeerReport,
        alive: Callable[[], bool],
    ) -> Response:
        chunks = 0
        try:
            response = await _answer_begun(
                self._client().post(url, data=body, headers=headers), alive
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise PeerUnreachable(str(exc) or type(exc).__name__) from None
        try:
            async with response:
                if response.status != 200 or "omni-stream" not in response.headers:
                    content = await response.read()
                    _raise_refusal(response.status, response.headers, content, url)
                    return response.status, 0, content
                _note(trace, response.headers, peer)
                buffer = b""
                async for piece in response.content.iter_any():
                    buffer += piece
                    while len(buffer) >= FRAME.size:
                        tag, length = FRAME.unpack_from(buffer)
                        if len(buffer) < FRAME.size + length:
                            break
                        data = buffer[FRAME.size : FRAME.size + length]
                        buffer = buffer[FRAME.size + length :]
                        if tag == b"C":
                            chunks += 1
                            if on_chunk is not None:
                                on_chunk(data)
                        else:
                            status, header_length = FINAL.unpack_from(data)
                            return status, header_length, data[FINAL.size :]
        except aiohttp.ClientError as exc:
            if not chunks:
                raise PeerUnreachable(f"the connection broke before the answer: {exc}") from None
            raise ModelUnavailable(f"the node serving this stream went away: {exc}") from None
        if not chunks:
            raise PeerUnreachable("the stream ended before its answer")
        raise ModelUnavailable("the node serving this stream ended it without an answer")


async def _answer_begun(
    request: Awaitable[aiohttp.ClientResponse], alive: Callable[[], bool]
) -> aiohttp.ClientResponse:
    """The response once its headers arrived; ``PeerUnreachable`` if the peer stopped
    reporting first (a peer gone without a reset would keep the request waiting for minutes)."""
    task = asyncio.ensure_future(request)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_SECONDS)
            if done:
                return task.result()
            if not alive():
                raise PeerUnreachable("its load reports stopped before its answer began")
    finally:
        if not task.done():
            task.cancel()


def _raise_refusal(status: int, headers: Mapping[str, str], content: bytes, name: str) -> None:
    refused = headers.get("omni-refused")
    if refused is None:
        return
    message = content.decode(errors="replace")
    if refused == "busy":
        raise ModelBusy(message)
    retry = headers.get("retry-after", "5")
    raise ModelUnavailable(message, int(retry) if retry.isdigit() else 5)


def _note(trace: Trace, headers: Mapping[str, str], peer: PeerReport) -> None:
    trace.served_by = headers.get("omni-node") or peer.node.name
    trace.route = headers.get("omni-route")
    trace.version = headers.get("omni-model-version")
