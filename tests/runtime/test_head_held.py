"""An answer's head and body leave in one send (server/connection.py ``_HeadHeld``), over a
real socket: nothing reaches the peer between uvicorn's two writes; a head whose body does not
follow at once (a stream's first event still to come) still leaves by the end of the loop's
pass; closing sends what is held."""

from __future__ import annotations

import asyncio
import socket

from omni_runtime.server.connection import _HeadHeld

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def _pair() -> tuple[asyncio.Transport, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    return transport, theirs


def _read(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


def test_the_head_waits_for_its_body_and_both_leave_together() -> None:
    async def run() -> None:
        transport, peer = await _pair()
        held = _HeadHeld(transport, asyncio.get_running_loop())
        held.write(HEAD)
        assert _read(peer) == b""  # held, not sent
        held.write(b"hello")
        assert _read(peer) == HEAD + b"hello"
        transport.close()
        peer.close()

    asyncio.run(run())


def test_a_head_alone_leaves_at_the_end_of_the_pass_and_close_sends_what_is_held() -> None:
    async def run() -> None:
        transport, peer = await _pair()
        loop = asyncio.get_running_loop()
        held = _HeadHeld(transport, loop)
        held.write(HEAD)
        await asyncio.sleep(0)  # the loop's pass ends
        await asyncio.sleep(0)
        assert _read(peer) == HEAD
        held.write(b"event")  # a body write after the head went: as it comes
        assert _read(peer) == b"event"
        second = _HeadHeld(transport, loop)
        second.write(HEAD)
        second.close()
        await asyncio.sleep(0.05)
        assert _read(peer) == HEAD
        peer.close()

    asyncio.run(run())
