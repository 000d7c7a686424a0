"""A worker polls for its next request after answering one that came with FLAG_POLL, and
sleeps at once after one without it (``WorkerLoop``). A real worker loop in a forked process,
over a real socket pair; whether it slept is read from the kernel's count of the times it
blocked (``voluntary_ctxt_switches``)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from omni_sdk import Engine
from omni_sdk._runners import runner_for
from omni_sdk.wire import FLAG_POLL, POLL_NS, FrameReader, Kind, Payloads, encode_frame
from omni_sdk.worker import WorkerLoop


class Text(BaseModel):
    text: str


class Echo(Engine):
    name = "@test/echo"

    def infer(self, request: Text) -> Text:
        return request


@pytest.fixture
def worker() -> Iterator[tuple[int, socket.socket]]:
    """A WorkerLoop serving Echo in a child process; yields its pid and the runtime's end."""
    runtime, ours = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            runtime.close()
            engine = Echo()
            engine.load(None)
            WorkerLoop(ours, runner_for(engine), Payloads(None), None).serve()
        finally:
            os._exit(0)
    ours.close()
    try:
        yield pid, runtime
    finally:
        runtime.close()  # the worker's recv returns b"": it exits
        os.waitpid(pid, 0)


def _sleeps(pid: int) -> int:
    """How many times the process has blocked (slept) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _one_by_one(runtime: socket.socket, count: int, flags: int) -> None:
    """``count`` requests, each sent as soon as the answer before it is in."""
    reader = FrameReader()
    for request_id in range(1, count + 1):
        body = json.dumps({"text": f"hello {request_id}"}).encode()
        runtime.sendall(encode_frame(Kind.RUN_JSON, request_id, body, flags))
        frames: list[tuple[int, int, int, bytes]] = []
        while not frames:
            data = runtime.recv(1 << 16)
            assert data, "the worker went away"
            frames.extend(reader.feed(data))
        kind, _, answered, body = frames[0]
        assert (kind, answered) == (Kind.RESPONSE, request_id)
        assert b"hello %d" % request_id in body


def test_after_a_request_with_flag_poll_the_worker_does_not_sleep_before_the_next(
    worker: tuple[int, socket.socket],
) -> None:
    pid, runtime = worker
    _one_by_one(runtime, 5, 0)  # loaded and warm
    before = _sleeps(pid)
    _one_by_one(runtime, 100, 0)
    sleeping = _sleeps(pid) - before
    before = _sleeps(pid)
    _one_by_one(runtime, 100, FLAG_POLL)
    polling = _sleeps(pid) - before
    # Without the flag it blocks in recv whenever the next request is not there yet; with
    # it, the next request comes while it polls (a loaded machine may make it miss a few).
    assert sleeping >= 25
    assert polling < sleeping / 2, (polling, sleeping)


def test_it_polls_for_poll_ns_at_most_then_sleeps(worker: tuple[int, socket.socket]) -> None:
    pid, runtime = worker
    _one_by_one(runtime, 3, FLAG_POLL)
    time.sleep(POLL_NS / 1e9 + 0.05)
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    assert state == "S"  # asleep in recv, not polling
    ticks = _cpu_ticks(pid)
    time.sleep(0.2)
    assert _cpu_ticks(pid) - ticks <= 1  # (a tick is 10 ms: it used none of these 200)
