"""Idle connections from outside: they must not use up the runtime's descriptors.

About 1,100 unauthenticated idle connections used to make a cold start fail with "Too many
open files", and the model stayed unavailable after the flood. Now at most
``server.max_connections`` stay open (the longest-idle ones go first), the runtime raises its
soft descriptor limit to the hard one at start, and a model whose start failed for want of
descriptors starts again once they are back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

ECHO = FIXTURES / "packages" / "echo-models"


@contextlib.contextmanager
def flood(runtime: RunningRuntime, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that never send a byte, held open until the block ends."""
    address = urlsplit(runtime.url)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):  # refused or reset once the runtime is full
                sockets.append(socket.create_connection((address.hostname, address.port), 2))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _open_files(runtime: RunningRuntime) -> int:
    """How many descriptors the runtime's process holds now."""
    try:
        return len(os.listdir(f"/proc/{runtime.process.pid}/fd"))
    except OSError:
        return 0


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _config(tmp_path: Path, max_connections: int) -> list[str]:
    config = tmp_path / "omni.toml"
    config.write_text(f"[server]\nmax_connections = {max_connections}\n")
    return ["--config", str(config), "--state-dir", str(tmp_path / "state")]


def test_the_longest_idle_connections_make_room_for_a_cold_start(tmp_path: Path) -> None:
    # 256 descriptors at most, 100 connections at most: the flood cannot starve the start.
    with (
        serve(ECHO, extra=_config(tmp_path, 100), open_files=256) as runtime,
        flood(runtime, 300) as idle,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        response = http.post("/ai/run/@test/echo", json={"text": "after the flood"})
        assert response.status_code == 200, response.text
        assert http.get("/v2/health/ready").status_code == 200
        closed = [_closed_by_peer(sock) for sock in idle]
        assert sum(closed) >= 200  # those past the limit, the earliest first
        assert all(closed[:150])


def test_a_start_that_failed_for_want_of_descriptors_is_retried(tmp_path: Path) -> None:
    # A connection limit above what the descriptors allow: the flood takes them all.
    with (
        serve(ECHO, extra=_config(tmp_path, 10_000), open_files=128) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        assert http.get("/v2/health/live").status_code == 200  # a connection, kept alive
        with flood(runtime, 200):
            # The kernel completes a connection before the runtime accepts it: wait until the
            # runtime has taken (nearly) every descriptor it may hold.
            deadline = time.monotonic() + 15
            while _open_files(runtime) < 120 and time.monotonic() < deadline:
                time.sleep(0.05)
            during = http.post("/ai/run/@test/echo", json={"text": "during the flood"})
            assert during.status_code == 503  # its worker could not be started
        runtime.wait_for_line("Too many open files")
        # The flood is over: the model serves again, and the node says it is ready.
        deadline = time.monotonic() + 45
        status = 0
        while time.monotonic() < deadline and status != 200:
            status = http.post("/ai/run/@test/echo", json={"text": "after"}).status_code
            time.sleep(0.5)
        assert status == 200
        assert http.get("/v2/health/ready").status_code == 200
