"""The runtime's end of a worker's socket: a payload that cannot travel fails alone."""

from __future__ import annotations

import asyncio
import json
import socket

from omni_runtime.workers.channel import WorkerChannel
from omni_sdk.wire import FrameReader, Kind, Payloads


def test_a_payload_that_cannot_be_handed_over_fails_that_request_alone() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        fds_ours, fds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds_theirs.close()  # the payload channel is gone: a large payload cannot be sent
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(
            lambda: WorkerChannel("model '@t/m'", Payloads(fds_ours, threshold=1024), fds_ours),
            sock=ours,
        )
        large = await channel.request(Kind.RUN_JSON, [b"x" * 4096])
        status, _, body = large
        assert status == 503
        assert "could not be handed to its worker" in json.loads(body)["errors"][0]["message"]
        assert channel.in_flight == 0  # nothing left waiting on the worker
        small = channel.request(Kind.INFER_V2, [b"{}"])  # the channel still works
        await asyncio.sleep(0.05)
        [(kind, _, _, payload)] = FrameReader().feed(theirs.recv(1 << 16))
        assert (kind, payload) == (Kind.INFER_V2, b"{}")
        assert not small.done() and channel.in_flight == 1
        theirs.close()  # the worker goes: what waited on it fails with the reason
        await asyncio.sleep(0.05)
        assert "worker exited" in str(small.exception())
        fds_ours.close()

    asyncio.run(scenario())


def test_requests_of_one_turn_leave_in_one_write_and_control_frames_keep_their_order() -> None:
    """A request to an idle worker leaves at once. Under load several requests reach the
    channel in one turn of the loop while the worker is at work: they go to it in one write
    (one system call, one wake-up of the worker). A control frame sent meanwhile (a CANCEL, a
    PING) goes after them, at once."""

    async def scenario() -> list[tuple[int, int]]:
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(
            lambda: WorkerChannel("model '@t/m'", Payloads(None), None), sock=ours
        )
        writes: list[bytes] = []
        transport = channel.transport
        assert transport is not None
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(data)
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        first = [channel.request(Kind.RUN_JSON, [b'{"n": %d}' % n]) for n in range(3)]
        assert len(writes) == 1  # the first, to an idle worker; the others at the end of the turn
        await asyncio.sleep(0)
        assert len(writes) == 2
        second = channel.request(Kind.RUN_JSON, [b'{"n": 3}'])
        assert len(writes) == 2  # the worker owes three answers: it waits for the turn's end
        channel.abandon(second)  # the CANCEL follows its request, in the same instant
        assert len(writes) == 4
        await asyncio.sleep(0.05)
        theirs.setblocking(False)
        frames = list(FrameReader().feed(theirs.recv(1 << 16)))
        theirs.close()
        await asyncio.sleep(0.05)
        for future in first:
            assert future.done()
        return [(kind, request_id) for kind, _, request_id, _ in frames]

    assert asyncio.run(scenario()) == [
        (Kind.RUN_JSON, 1), (Kind.RUN_JSON, 2), (Kind.RUN_JSON, 3),
        (Kind.RUN_JSON, 4), (Kind.CANCEL, 4),
    ]  # fmt: skip
