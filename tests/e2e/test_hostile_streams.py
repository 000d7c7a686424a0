"""A streamed answer's chunks waiting for a client that never reads: they used to pile up in
the runtime (about a gigabyte); now they hold back the worker instead."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_client_that_never_reads_holds_back_its_worker_not_the_runtimes_memory(
    tmp_path: Path,
) -> None:
    with (
        serve(FIXTURES / "packages" / "stream-models") as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        assert http.post("/ai/run/@test/words", json={"prompt": "warm"}).status_code == 200
        before = _rss(runtime.process.pid)
        # 4 KB a chunk, 100,000 chunks: 400 MB if nothing held the worker back.
        body = json.dumps({"prompt": "x" * 4_000, "max_tokens": 100_000, "stream": True})
        address = urlsplit(runtime.url)
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect((address.hostname, address.port))
        reader.sendall(
            b"POST /ai/run/@test/words HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n{body}".encode()
        )
        try:
            time.sleep(8)  # the worker could send gigabytes in this time
            grown = _rss(runtime.process.pid) - before
            assert grown < 100 << 20, f"the runtime grew by {grown >> 20} MiB"
            assert reader.recv(65536).startswith(b"HTTP/1.1 200")  # the stream is alive
        finally:
            reader.close()
        # The client went away: its stream ends, and the worker serves the next request.
        response = http.post("/ai/run/@test/words", json={"prompt": "next"})
        assert response.status_code == 200
        assert response.json()["result"]["response"].startswith("next")
