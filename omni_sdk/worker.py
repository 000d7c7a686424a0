"""``python -m omni_sdk.worker``: serve one engine to omni-runtime over a Unix socket.

The runtime starts this in the model's own environment with the worker's end of a socket
pair as ``--fd``. The worker imports the package, loads the engine, says HELLO (or
LOAD_FAILED with the reason), then answers frames (``omni_sdk.wire``) until the runtime
says SHUTDOWN or goes away. Requests that arrive together are decoded together, batched when
the engine batches, and answered with one write.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import inspect
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
from time import perf_counter_ns
from typing import Any

from omni_sdk._engine import Engine, LoadContext
from omni_sdk._plugins import EnginePlugins
from omni_sdk._resources import Resources
from omni_sdk._runners import runner_for
from omni_sdk._serving import EngineRunner, Prepared
from omni_sdk._streaming import encode_chunk
from omni_sdk._tensors import DEFAULT_MAX_TENSOR_ELEMENTS
from omni_sdk.envelopes import ai_error_body, v2_error_body
from omni_sdk.sequences import SequenceControls
from omni_sdk.wire import (
    FLAG_POLL,
    POLL_NS,
    PROTOCOL_VERSION,
    RESPONSE_PREFIX,
    V2_PREFIX,
    FrameReader,
    Kind,
    Payloads,
    encode_frame,
    payload,
)

log = logging.getLogger("omni.worker")
_PR_SET_PDEATHSIG = 1
_cuda_device = 0  # the GPU this worker's model runs on ("cuda:N" → N)


def _die_with_parent() -> None:
    """Ask the kernel to kill this worker if the runtime dies without stopping it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def load_engine(
    package: Path,
    model: str,
    device: str,
    resources: Resources,
    timings: dict[str, float] | None = None,
) -> Engine:
    """Import the package, find the engine and load it; ``timings`` gets import and load seconds."""
    started = time.monotonic()
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
    imported = time.monotonic()
    engine.load(ctx)
    if timings is not None:
        timings["import"] = imported - started
        timings["load"] = time.monotonic() - imported
    return engine


class WorkerLoop:
    """Serves a synchronous engine: read what has arrived, answer it all, write once."""

    def __init__(
        self, sock: socket.socket, runner: EngineRunner, shm: Payloads, fds: socket.socket | None
    ) -> None:
        self.sock = sock
        self.runner = runner
        self.shm = shm
        self.fds = fds
        self.reader = FrameReader()
        self.stopping = False
        self.poll = False  # poll for the next frame before sleeping (FLAG_POLL)

    def _receive(self) -> bytes:
        """The next bytes from the runtime. After a request that came with FLAG_POLL, the
        socket is polled for up to POLL_NS before the worker sleeps: the runtime sets it only
        while a core is spare, for one worker at a time."""
        if self.poll:
            self.poll = False
            recv = self.sock.recv
            until = perf_counter_ns() + POLL_NS
            while perf_counter_ns() < until:
                try:
                    return recv(1 << 18, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        return self.sock.recv(1 << 18)

    def serve(self) -> None:
        pending: list[Frame] = []
        while not self.stopping:
            if not pending:
                data = self._receive()
                if not data:
                    return  # the runtime went away
                pending.extend(self.reader.feed(data))
                self.poll = any(frame[1] & FLAG_POLL for frame in pending)
            self._fill_batch(pending)
            batch, streams, control, pending, self.stopping = split_frames(
                self.runner, pending, self.fds
            )
            if control:
                self.sock.sendall(b"".join(control))
            run = self.runner.run
            if batch and self.runner.batch_size > 1:
                began = perf_counter_ns()
                outcomes = run([p for _, p in batch])
                took = perf_counter_ns() - began
                self.sock.sendall(answer(self.runner, self.shm, batch, outcomes, took))
            else:
                for item in batch:  # each answer leaves as soon as it is ready
                    began = perf_counter_ns()
                    outcomes = run([item[1]])
                    took = perf_counter_ns() - began
                    self.sock.sendall(answer(self.runner, self.shm, [item], outcomes, took))
            for request_id, streamed in streams:  # (it came after the batch's requests)
                if streamed is not None:  # None: a CANCEL for a stream already over
                    pending = self._stream(request_id, streamed, pending)

    def _stream(self, request_id: int, prepared: Prepared, pending: list[Frame]) -> list[Frame]:
        """Send each chunk as the engine yields it; stop when the runtime says CANCEL."""
        runner = self.runner
        chunks: Any = None
        try:
            if prepared.request is None:
                self.sock.sendall(answer(runner, self.shm, [(request_id, prepared)], [None]))
                return pending
            cancel = (Kind.CANCEL, 0, request_id)
            if any(frame[:3] == cancel for frame in pending):  # cancelled before it began
                pending = [frame for frame in pending if frame[:3] != cancel]
                self.sock.sendall(_stream_end(request_id, 499, prepared, "cancelled"))
                return pending
            chunks = stream_of(runner.engine, prepared.request)
            for chunk in chunks:
                body = chunk_body(runner, prepared, chunk)
                self.sock.sendall(self.shm.frame(Kind.CHUNK, request_id, body))
                pending, cancelled = self._poll(request_id, pending)
                if cancelled:
                    if hasattr(chunks, "close"):
                        chunks.close()  # GeneratorExit inside the engine's generator
                    self.sock.sendall(_stream_end(request_id, 499, prepared, "cancelled"))
                    return pending
            self.sock.sendall(_stream_end(request_id, 200, prepared))
        except Exception as exc:  # whatever the engine does costs this stream alone
            log.exception("model %r: a streamed request failed", runner.model_name)
            self.sock.sendall(_stream_end(request_id, 500, prepared, _failure(runner, exc)))
        return pending

    def _poll(self, request_id: int, pending: list[Frame]) -> tuple[list[Frame], bool]:
        """Frames that arrived meanwhile: a CANCEL of this stream, the rest kept for later."""
        if not select.select([self.sock], [], [], 0)[0]:
            return pending, False
        data = self.sock.recv(1 << 18)
        if not data:
            self.stopping = True
            return pending, True  # the runtime went away
        cancelled = False
        for frame in self.reader.feed(data):
            if frame[0] == Kind.CANCEL and frame[2] == request_id:
                cancelled = True
            else:
                pending.append(frame)
        return pending, cancelled

    def _fill_batch(self, pending: list[Frame]) -> None:
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


class AsyncWorker(asyncio.Protocol):
    """Serves an ``async def`` engine: every batch that arrives runs as its own task."""

    def __init__(
        self,
        runner: EngineRunner,
        shm: Payloads,
        fds: socket.socket | None,
        done: asyncio.Future[None],
    ) -> None:
        self.runner = runner
        self.shm = shm
        self.fds = fds
        self.done = done
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.streams: dict[int, asyncio.Future[None]] = {}
        self.stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        frames = list(self.reader.feed(data))
        while frames and not self.stopping:
            batch, streams, control, frames, self.stopping = split_frames(
                self.runner, frames, self.fds
            )
            if control:
                self.transport.write(b"".join(control))
            for request_id, item in streams:
                if item is None:
                    running = self.streams.pop(request_id, None)
                    if running is not None:
                        running.cancel()
                    continue
                stream = asyncio.ensure_future(self._stream(request_id, item))
                self.streams[request_id] = stream
                self.tasks.add(stream)
                stream.add_done_callback(self._finished)
            if batch:
                task = asyncio.ensure_future(self._answer(batch))
                self.tasks.add(task)
                task.add_done_callback(self._finished)
        if self.stopping and not self.tasks:
            self._finish()

    async def _stream(self, request_id: int, prepared: Prepared) -> None:
        runner = self.runner
        assert self.transport is not None
        chunks: Any = None
        try:
            if prepared.request is None:
                self.transport.write(answer(runner, self.shm, [(request_id, prepared)], [None]))
                return
            chunks = stream_of(runner.engine, prepared.request)
            if hasattr(chunks, "__aiter__"):
                async for chunk in chunks:
                    self._chunk(request_id, prepared, chunk)
            else:
                for chunk in await _maybe_await(chunks):
                    self._chunk(request_id, prepared, chunk)
            self._write(_stream_end(request_id, 200, prepared))
        except asyncio.CancelledError:  # the client went away: close the generator
            if chunks is not None and hasattr(chunks, "aclose"):
                await chunks.aclose()
            self._write(_stream_end(request_id, 499, prepared, "cancelled"))
        except Exception as exc:
            log.exception("model %r: a streamed request failed", runner.model_name)
            self._write(_stream_end(request_id, 500, prepared, _failure(runner, exc)))
        finally:
            self.streams.pop(request_id, None)

    def _chunk(self, request_id: int, prepared: Prepared, chunk: Any) -> None:
        self._write(
            self.shm.frame(Kind.CHUNK, request_id, chunk_body(self.runner, prepared, chunk))
        )

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _answer(self, batch: list[tuple[int, Prepared]]) -> None:
        began = perf_counter_ns()
        outcomes = await self.runner.arun([p for _, p in batch])
        took = perf_counter_ns() - began
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer(self.runner, self.shm, batch, outcomes, took))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.stopping and not self.tasks:
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()


Frame = tuple[int, int, int, bytes]


def split_frames(
    runner: EngineRunner, frames: list[Frame], fds: socket.socket | None
) -> tuple[
    list[tuple[int, Prepared]], list[tuple[int, Prepared | None]], list[bytes], list[Frame], bool
]:
    """Decode requests; answer pings.

    Returns (requests, streams, replies, frames left, stopping); a stream whose Prepared is
    None is a CANCEL of that request. A request that cannot even be decoded fails alone, with
    an error naming the model.
    """
    batch: list[tuple[int, Prepared]] = []
    streams: list[tuple[int, Prepared | None]] = []
    control: list[bytes] = []
    for index, (kind, flags, request_id, body) in enumerate(frames):
        if kind in (Kind.INFER_V2, Kind.RUN_JSON):
            batch.append((request_id, _prepare(runner, kind, flags, body, fds)))
        elif kind == Kind.RUN_STREAM or kind == Kind.STREAM_V2:
            decode = Kind.RUN_JSON if kind == Kind.RUN_STREAM else Kind.INFER_V2
            streams.append((request_id, _prepare(runner, decode, flags, body, fds)))
            return batch, streams, control, frames[index + 1 :], False
        elif kind == Kind.CANCEL:
            streams.append((request_id, None))
        elif kind == Kind.PING:
            control.append(encode_frame(Kind.PONG, request_id))
        elif kind == Kind.PREFETCH:
            prefetch(runner.model_name, body)
        elif kind == Kind.SHUTDOWN:
            return batch, streams, control, frames[index + 1 :], True
        if runner.batch_size > 1 and len(batch) >= runner.batch_size:
            return batch, streams, control, frames[index + 1 :], False
    return batch, streams, control, [], False


def stream_of(engine: Engine, request: Any) -> Any:
    """The chunks of one streamed request: the engine's own generator, else its one answer."""
    result = type(engine).infer(engine, request)
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        return result
    return _one(result)


async def _one_async(result: Any) -> list[Any]:
    return [await result]


def _one(result: Any) -> Any:
    return _one_async(result) if inspect.isawaitable(result) else [result]


async def _maybe_await(chunks: Any) -> Any:
    return await chunks if inspect.isawaitable(chunks) else chunks


def _failure(runner: EngineRunner, exc: Exception) -> str:
    return f"model '{runner.model_name}' failed while streaming: {type(exc).__name__}: {exc}"


def chunk_body(runner: EngineRunner, prepared: Prepared, chunk: Any) -> list[bytes]:
    """One chunk of a stream: its JSON (/ai/run), or V2_PREFIX and a v2 inference response
    (STREAM_V2, a decoupled model's response)."""
    if not prepared.v2:
        return [encode_chunk(runner.response_model, chunk)]
    header_length, parts = runner.encode_v2_chunk(prepared, chunk)
    return [V2_PREFIX.pack(header_length), *parts]


def _stream_end(request_id: int, status: int, prepared: Prepared, error: str = "") -> bytes:
    """The RESPONSE that ends a stream: empty when it went well, else the error's envelope."""
    envelope = v2_error_body(error) if prepared.v2 else ai_error_body(status, error)
    body = envelope if error else b""
    return encode_frame(
        Kind.RESPONSE, request_id, RESPONSE_PREFIX.pack(status, 0, 0, 0, 0, 0) + body
    )


def prefetch(model: str, where: bytes) -> None:
    """Move this worker's GPU memory to the device or the host, where libomnicuda is loaded."""
    if "libomnicuda" not in os.environ.get("LD_PRELOAD", ""):
        return  # a CPU worker, or one without the hooks: nothing to move
    try:
        import omni_cstub

        hooks = omni_cstub.Hooks()
        if where == b"device":
            hooks.prefetch_to_device(_cuda_device)
        else:
            hooks.prefetch_to_host()
    except Exception as exc:  # a failed prefetch costs speed, never a request
        log.warning(
            "model %r: prefetch to %s failed: %s", model, where.decode(errors="replace"), exc
        )


def _prepare(
    runner: EngineRunner, kind: int, flags: int, body: bytes, fds: socket.socket | None
) -> Prepared:
    began = perf_counter_ns()
    prepared = _decode(runner, kind, flags, body, fds)
    prepared.input_ns = perf_counter_ns() - began
    return prepared


def _decode(
    runner: EngineRunner, kind: int, flags: int, body: bytes, fds: socket.socket | None
) -> Prepared:
    v2 = kind == Kind.INFER_V2
    try:
        raw = payload(flags, body, fds)
        data = memoryview(raw) if isinstance(raw, bytearray) else raw
        if not v2:
            return runner.prepare_json(data)
        (header_length,) = V2_PREFIX.unpack_from(data)
        return runner.prepare_v2(memoryview(data)[V2_PREFIX.size :], header_length)
    except Exception as exc:  # whatever a request does, it costs only that request
        log.exception("could not decode a request")
        message = f"model '{runner.model_name}' could not read the request: {type(exc).__name__}"
        return Prepared(v2=v2, status=500, error=message)


def answer(
    runner: EngineRunner,
    shm: Payloads,
    batch: list[tuple[int, Prepared]],
    outcomes: list[Any],
    infer_ns: int = 0,
) -> bytes:
    """The RESPONSE frames of ``batch``, each carrying where the worker spent its time: a
    batch's requests each name the whole batch's times (as Triton counts them), requests
    that ran alone their own; a request that did not run names none."""
    prepared = [p for _, p in batch]
    began = perf_counter_ns()
    responses = runner.respond_all(prepared, outcomes)
    output_ns = perf_counter_ns() - began
    ran = sum(1 for p in prepared if p.valid)
    batched = runner.batch_size > 1
    size = ran if batched else 1
    input_ns = sum(p.input_ns for p in prepared if p.valid) if batched else 0
    if not batched and ran > 1:  # (requests an async engine ran side by side)
        output_ns //= ran
    frames = []
    for (request_id, item), (status, header_length, parts) in zip(batch, responses, strict=True):
        prefix = RESPONSE_PREFIX.pack(
            status,
            header_length,
            size if item.valid else 0,
            input_ns if batched else item.input_ns,
            infer_ns,
            output_ns,
        )
        try:
            frames.append(shm.frame(Kind.RESPONSE, request_id, [prefix, *parts]))
        except OSError as exc:  # no memory for a large answer: that request fails, alone
            log.error("model %r: could not send an answer: %s", runner.model_name, exc)
            message = f"model '{runner.model_name}' could not send its answer: {exc}"
            error = v2_error_body(message) if item.v2 else ai_error_body(500, message)
            body = RESPONSE_PREFIX.pack(500, 0, 0, 0, 0, 0) + error
            frames.append(encode_frame(Kind.RESPONSE, request_id, body))
    return b"".join(frames)


async def serve_async(
    sock: socket.socket, runner: EngineRunner, shm: Payloads, fds: socket.socket | None
) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_unix_connection(
        lambda: AsyncWorker(runner, shm, fds, done), sock=sock
    )
    try:
        await done
    finally:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_sdk.worker")
    parser.add_argument("--fd", type=int, required=True, help="the worker's end of the socket")
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-version", default="1", help="the version its answers name")
    parser.add_argument("--resources", default="{}", help="Resources as JSON")
    parser.add_argument("--fd-channel", type=int, help="the socket large payloads' memfds use")
    parser.add_argument("--shm-threshold", type=int, default=256 * 1024)
    parser.add_argument(
        "--max-tensor-elements",
        type=int,
        default=DEFAULT_MAX_TENSOR_ELEMENTS,
        help="a v2 input whose shape holds more elements gets 400",
    )
    parser.add_argument("--sequence", help="SequenceControls as JSON: a sequence model's controls")
    args = parser.parse_args(argv)
    main_started = time.monotonic()  # the runtime compares it with when it spawned us
    inherited = len(sys.modules)  # (a fork has its pre-warmed process's modules already)
    global _cuda_device
    _cuda_device = int(args.device.partition(":")[2] or 0) if args.device.startswith("cuda") else 0
    _die_with_parent()
    logging.basicConfig(
        level=os.environ.get("OMNI_LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    started = time.perf_counter()
    timings: dict[str, float] = {"main": main_started}
    try:
        resources = Resources.model_validate(json.loads(args.resources))
        engine = load_engine(args.package.resolve(), args.model, args.device, resources, timings)
        runner = runner_for(engine, args.model, max_tensor_elements=args.max_tensor_elements)
        runner.model_version = args.model_version
        if args.sequence:
            runner.use_sequences(SequenceControls.model_validate_json(args.sequence))
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
        "timings": timings,
        # What it imported, in order, so the runtime can pre-warm the model's next worker;
        # the first `modules_inherited` were there when main() began.
        "modules": list(sys.modules),
        "modules_inherited": inherited,
    }
    sock.sendall(encode_frame(Kind.HELLO, 0, json.dumps(hello).encode()))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the runtime drains us with SHUTDOWN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fds = socket.socket(fileno=args.fd_channel) if args.fd_channel is not None else None
    shm = Payloads(fds, args.shm_threshold)
    try:
        if runner.is_async:
            asyncio.run(serve_async(sock, runner, shm, fds))
        else:
            WorkerLoop(sock, runner, shm, fds).serve()
    finally:
        engine.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
