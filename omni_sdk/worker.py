"""``python -m omni_sdk.worker``: serve one engine to omni-runtime over a Unix socket.

The runtime starts this in the model's own environment with the worker's end of a socket
pair as ``--fd``. The worker imports the package, loads the engine, says HELLO (or
LOAD_FAILED with the reason), then answers frames (``omni_sdk._protocol``) until the runtime
says SHUTDOWN or goes away. Requests that arrive together are decoded together, batched when
the engine batches, and answered with one write.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from omni_sdk._engine import Engine, LoadContext
from omni_sdk._plugins import EnginePlugins
from omni_sdk._protocol import (
    PROTOCOL_VERSION,
    RESPONSE_PREFIX,
    V2_PREFIX,
    FrameReader,
    Kind,
    ShmSegments,
    encode_frame,
    payload,
)
from omni_sdk._resources import Resources
from omni_sdk._serving import EngineRunner, Prepared

log = logging.getLogger("omni.worker")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to kill this worker if the runtime dies without stopping it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def load_engine(package: Path, model: str, device: str, resources: Resources) -> Engine:
    plugins = EnginePlugins()
    plugins.load_package(package)
    engines = {engine.name: engine for engine in plugins.engines()}
    if model not in engines:
        raise LookupError(f"package {package} no longer registers model {model!r}")
    engine = engines[model]()
    ctx = LoadContext(
        model_name=model,
        device=device,
        model_dir=package,
        resources=resources,
        logger=logging.getLogger(f"omni.model.{model}"),
    )
    engine.load(ctx)
    return engine


class WorkerLoop:
    """Reads frames, runs the engine, writes responses; one instance per worker process."""

    def __init__(self, sock: socket.socket, runner: EngineRunner, shm: ShmSegments) -> None:
        self.sock = sock
        self.runner = runner
        self.shm = shm
        self.reader = FrameReader()
        self.loop = asyncio.new_event_loop() if runner.is_async else None
        self.stopping = False

    def serve(self) -> None:
        pending: list[tuple[int, int, int, bytes]] = []
        while not self.stopping:
            if not pending:
                data = self.sock.recv(1 << 18)
                if not data:
                    return  # the runtime went away
                pending.extend(self.reader.feed(data))
            self._fill_batch(pending)
            batch, pending = self._take(pending)
            if batch:
                self.sock.sendall(self._answer(batch))

    def _fill_batch(self, pending: list[tuple[int, int, int, bytes]]) -> None:
        """Wait up to the engine's batch_timeout for a batch to fill."""
        timeout = type(self.runner.engine).batch_timeout
        if self.runner.batch_size <= 1 or timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        while len(pending) < self.runner.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                return
            data = self.sock.recv(1 << 18)
            if not data:
                return
            pending.extend(self.reader.feed(data))

    def _take(
        self, pending: list[tuple[int, int, int, bytes]]
    ) -> tuple[list[tuple[int, Prepared]], list[tuple[int, int, int, bytes]]]:
        batch: list[tuple[int, Prepared]] = []
        control: list[bytes] = []
        for index, (kind, flags, request_id, body) in enumerate(pending):
            if kind == Kind.INFER_V2:
                data = payload(flags, body)
                (header_length,) = V2_PREFIX.unpack_from(data)
                batch.append(
                    (request_id, self.runner.prepare_v2(memoryview(data)[V2_PREFIX.size :], header_length))
                )
            elif kind == Kind.RUN_JSON:
                batch.append((request_id, self.runner.prepare_json(payload(flags, body))))
            elif kind == Kind.PING:
                control.append(encode_frame(Kind.PONG, request_id))
            elif kind == Kind.SHUTDOWN:
                self.stopping = True
                rest = pending[index + 1 :]
                if control:
                    self.sock.sendall(b"".join(control))
                return batch, rest
        if control:
            self.sock.sendall(b"".join(control))
        return batch, []

    def _answer(self, batch: list[tuple[int, Prepared]]) -> bytes:
        prepared = [p for _, p in batch]
        if self.loop is not None:
            outcomes = self.loop.run_until_complete(self.runner.arun(prepared))
        else:
            outcomes = self.runner.run(prepared)
        frames = []
        for (request_id, _), (status, header_length, parts) in zip(
            batch, self.runner.respond_all(prepared, outcomes), strict=True
        ):
            prefix = RESPONSE_PREFIX.pack(status, header_length)
            frames.append(self.shm.frame(Kind.RESPONSE, request_id, [prefix, *parts]))
        return b"".join(frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_sdk.worker")
    parser.add_argument("--fd", type=int, required=True, help="the worker's end of the socket")
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resources", default="{}", help="Resources as JSON")
    parser.add_argument("--shm-prefix", required=True)
    parser.add_argument("--shm-threshold", type=int, default=256 * 1024)
    args = parser.parse_args(argv)

    _die_with_parent()
    logging.basicConfig(
        level=os.environ.get("OMNI_LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    started = time.perf_counter()
    try:
        resources = Resources.model_validate(json.loads(args.resources))
        engine = load_engine(args.package.resolve(), args.model, args.device, resources)
        runner = EngineRunner(engine, args.model)
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("model %r failed to load:\n%s", args.model, traceback.format_exc())
        message = json.dumps({"error": f"model '{args.model}' failed to load: {detail}"})
        sock.sendall(encode_frame(Kind.LOAD_FAILED, 0, message.encode()))
        return 3
    hello = {
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "model": args.model,
        "load_seconds": time.perf_counter() - started,
    }
    sock.sendall(encode_frame(Kind.HELLO, 0, json.dumps(hello).encode()))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the runtime drains us with SHUTDOWN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = ShmSegments(args.shm_prefix, args.shm_threshold)
    try:
        WorkerLoop(sock, runner, shm).serve()
    finally:
        engine.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
