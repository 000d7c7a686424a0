"""A worker polls its socket before it sleeps only while requests come quickly
(``WorkerLoop._receive``): after a quick request it polls, and takes what arrives while it
does; after a long gap it sleeps at once. Over a real socket pair."""

from __future__ import annotations

import socket
import threading
import time

from omni_sdk.worker import SPIN_AFTER_NS, SPIN_NS, WorkerLoop


def _loop(sock: socket.socket) -> WorkerLoop:
    return WorkerLoop(sock, runner=None, shm=None, fds=None)  # type: ignore[arg-type]


def test_quick_requests_make_it_poll_and_a_long_gap_makes_it_sleep() -> None:
    ours, runtime = socket.socketpair()
    with ours, runtime:
        loop = _loop(ours)
        runtime.sendall(b"first")  # already there: no wait at all
        assert loop._receive() == b"first" and loop.spin
        # polling, it takes what arrives meanwhile
        threading.Timer(SPIN_NS / 1e9 / 3, runtime.sendall, (b"second",)).start()
        assert loop._receive() == b"second"
        # nothing for much longer than it polls: it ends up asleep, and stops polling
        gap = 2 * (SPIN_NS + SPIN_AFTER_NS) / 1e9
        threading.Timer(gap, runtime.sendall, (b"late",)).start()
        started = time.monotonic()
        assert loop._receive() == b"late"
        assert time.monotonic() - started >= gap * 0.9
        assert not loop.spin
