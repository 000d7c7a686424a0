"""The wire protocol between omni-runtime and a worker process (public and versioned).

The runtime and each worker (``python -m omni_sdk.worker`` in the model's own environment) talk
over a Unix socket pair. Every message is one frame: a 16-byte little-endian header (``HEADER``)
followed by ``length`` bytes of body::

    length  u32   bytes of body after the header, at most MAX_FRAME (64 MiB)
    version u8    PROTOCOL_VERSION; a peer refuses any other (ProtocolError)
    kind    u8    a Kind
    flags   u16   FLAG_FD: the payload is in a memfd; the body is its u64 size (FD_REF)
                  FLAG_POLL (a request): the runtime has a core to spare; once the worker has
                  answered, it polls for its next frame for up to POLL_NS before it sleeps
    id      u64   request id, echoed in the response

Kinds (``Kind``), and their bodies:

    HELLO 1        worker → runtime  JSON {"protocol", "pid", "model", "timings", "modules",
                                     ...} once the engine loaded
    LOAD_FAILED 2  worker → runtime  JSON {"error"}; the worker exits after it
    INFER_V2 3     runtime → worker  V2_PREFIX (u32 Inference-Header-Content-Length, 0 for
                                     plain JSON) + the v2 request body as received
    RUN_JSON 4     runtime → worker  the /ai/run JSON body
    RESPONSE 5     worker → runtime  RESPONSE_PREFIX (u16 HTTP status, u32 header length,
                                     u16 batch size, u64 ns decoding inputs, running the
                                     engine, encoding outputs; a batch size of 0: not run) +
                                     the HTTP response body
    SHUTDOWN 6     runtime → worker  finish what is in flight, then exit
    PING 7, PONG 8                   liveness
    PREFETCH 9     runtime → worker  b"device" or b"host": where its GPU memory should live
    RUN_STREAM 10  runtime → worker  an /ai/run body whose answer is streamed
    CHUNK 11       worker → runtime  one output chunk (JSON) of a streamed request
    CANCEL 12      runtime → worker  the client of a streamed request went away
    STREAM_V2 13   runtime → worker  as INFER_V2, answered as a stream: each CHUNK is
                                     V2_PREFIX + one v2 inference response (a decoupled model)

A peer ignores a kind it does not know, so a new kind needs no new version; a change to the
header or to the meaning of an existing body bumps ``PROTOCOL_VERSION``.

No pickle crosses the boundary: bodies are JSON or the raw bytes of the KServe v2 binary
tensor extension, so a worker in a venv with other library versions still understands them.
Payloads of ``shm_threshold`` bytes (``DEFAULT_SHM_THRESHOLD``, 256 KiB) or more travel as a
sealed memfd whose descriptor is passed over a second socket (``Payloads``, ``payload``); the
receiver reads at most ``MAX_PAYLOAD`` bytes from it. docs/architecture.md tells the whole story.
"""

from __future__ import annotations

import array
import enum
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

__all__ = [
    "DEFAULT_SHM_THRESHOLD",
    "FD_REF",
    "FLAG_FD",
    "FLAG_POLL",
    "HEADER",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "POLL_NS",
    "PROTOCOL_VERSION",
    "RESPONSE_PREFIX",
    "V2_PREFIX",
    "FrameReader",
    "Kind",
    "PayloadError",
    "Payloads",
    "ProtocolError",
    "encode_frame",
    "payload",
    "read_payload",
    "receive_fd",
    "write_memfd",
]

PROTOCOL_VERSION = 3
HEADER = struct.Struct("<IBBHQ")
FLAG_FD = 0x1
# Set by the runtime on a request whose worker has a core to spare: a process woken from
# sleep answers 30-150 us late on a virtual machine, so a worker that polls for the request that
# follows its answer (a client waiting on each answer) saves that. A worker ignores flags it
# does not know, so an older one just sleeps.
FLAG_POLL = 0x2
POLL_NS = 300_000
FD_REF = struct.Struct("<Q")  # the payload's size; its memfd came over the side channel
MAX_FRAME = 64 << 20  # the longest frame body either side accepts on the socket itself
MAX_PAYLOAD = 4 << 30  # the largest payload either side reads from a memfd
_SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL | SHRINK | GROW | WRITE
V2_PREFIX = struct.Struct("<I")  # Inference-Header-Content-Length, 0 for a plain JSON body
# HTTP status, Inference-Header-Content-Length, then where the worker spent its time: the
# requests it ran together (0: this one did not run), and nanoseconds decoding their inputs,
# running the engine and encoding the outputs (Triton's compute_input, _infer, _output).
RESPONSE_PREFIX = struct.Struct("<HIHQQQ")
DEFAULT_SHM_THRESHOLD = 256 * 1024


class Kind(enum.IntEnum):
    HELLO = 1  # worker → runtime: JSON {"protocol", "pid", "model"} once the engine loaded
    LOAD_FAILED = 2  # worker → runtime: JSON {"error"}; the worker exits after it
    INFER_V2 = 3  # runtime → worker: V2_PREFIX + the v2 request body
    RUN_JSON = 4  # runtime → worker: the /ai/run JSON body
    RESPONSE = 5  # worker → runtime: RESPONSE_PREFIX + response body
    SHUTDOWN = 6  # runtime → worker: finish what is in flight, then exit
    PING = 7
    PONG = 8
    PREFETCH = 9  # runtime → worker: b"device" or b"host", where its GPU memory should live
    RUN_STREAM = 10  # runtime → worker: an /ai/run body whose answer is streamed in chunks
    CHUNK = 11  # worker → runtime: one output chunk (JSON) of a streamed request
    CANCEL = 12  # runtime → worker: the client of a streamed request went away; stop it
    STREAM_V2 = 13  # runtime → worker: a v2 request whose chunks come as v2 responses


class ProtocolError(Exception):
    """The peer sent something this side cannot read: the connection cannot go on."""


class PayloadError(Exception):
    """One message's payload could not be read: that message fails, the connection goes on."""


def encode_frame(kind: int, request_id: int, body: bytes = b"", flags: int = 0) -> bytes:
    return _head(len(body), kind, flags, request_id) + body


def _head(size: int, kind: int, flags: int, request_id: int) -> bytes:
    """A frame's header, before ``size`` bytes of body."""
    return HEADER.pack(size, PROTOCOL_VERSION, kind, flags, request_id)


class FrameReader:
    """Splits a byte stream into ``(kind, flags, request_id, body)`` frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
        buffer = self._buffer
        # Whole frames are cut straight out of ``data`` where nothing waits before it (most
        # reads): one copy of each body rather than three.
        direct = not buffer and type(data) is bytes
        source: bytes | bytearray = data if direct else buffer
        if not direct:
            buffer += data
        offset = 0
        size = len(source)
        header_size = HEADER.size
        while size - offset >= header_size:
            length, version, kind, flags, request_id = HEADER.unpack_from(source, offset)
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {version}, this side speaks "
                    f"{PROTOCOL_VERSION}: install the same omni-sdk in the model's environment"
                )
            if length > MAX_FRAME:
                raise ProtocolError(f"a frame of {length} bytes is over the limit of {MAX_FRAME}")
            end = offset + header_size + length
            if end > size:
                break
            if direct:
                body = data[offset + header_size : end]
            else:
                with memoryview(buffer) as view:
                    body = bytes(view[offset + header_size : end])
            yield kind, flags, request_id, body
            offset = end
        if direct:
            buffer += data[offset:]  # the start of a frame still to come, if any
        elif offset:
            del buffer[:offset]


class Payloads:
    """Sends the payloads of one side's frames: inline when small, through a memfd when large.

    A large payload is written into an anonymous, sealed memory file (``memfd_create``) whose
    descriptor travels over the side channel ``fds`` (SCM_RIGHTS) just before its frame. No
    file has a name another process could open, truncate or fill, and the receiver reads it
    with ``pread`` rather than mapping it, so nothing a peer does to it can raise SIGBUS.
    """

    __slots__ = ("fds", "threshold")

    def __init__(self, fds: socket.socket | None, threshold: int = DEFAULT_SHM_THRESHOLD) -> None:
        self.fds = fds
        self.threshold = threshold

    def frame(
        self, kind: int, request_id: int, parts: list[bytes] | tuple[bytes, ...], flags: int = 0
    ) -> bytes:
        """One frame carrying ``parts``. Raises ``OSError`` when a large payload cannot be
        written (memory is short): that one message fails, nothing else."""
        size = sum(map(len, parts))
        if size < self.threshold or self.fds is None:  # (one copy of the parts, not two)
            return b"".join([_head(size, kind, flags, request_id), *parts])
        fd = write_memfd(parts, size)
        try:
            self.fds.sendmsg(
                [b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
        finally:
            os.close(fd)
        return encode_frame(kind, request_id, FD_REF.pack(size), FLAG_FD | flags)


def write_memfd(parts: list[bytes] | tuple[bytes, ...], size: int) -> int:
    """A sealed memfd holding ``parts``; the caller closes it."""
    fd = os.memfd_create("omni-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        written = 0
        while views:
            n = os.writev(fd, views)
            written += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        if written != size:
            raise OSError(f"wrote {written} of {size} bytes of a payload")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def receive_fd(fds: socket.socket) -> int:
    """The next descriptor the peer sent on its side channel (it precedes its frame)."""
    received = array.array("i")
    try:
        _, ancillary, _, _ = fds.recvmsg(
            1, socket.CMSG_SPACE(received.itemsize), socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        raise ProtocolError("a frame named a payload descriptor that never came") from None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received.frombytes(data[: len(data) - (len(data) % received.itemsize)])
    if len(received) != 1:
        for fd in received:
            os.close(fd)
        raise ProtocolError("a payload descriptor message carried no descriptor")
    return received[0]


def read_payload(fd: int, size: int, limit: int = MAX_PAYLOAD) -> bytearray:
    """Read a payload of ``size`` bytes from ``fd`` with ``pread``; ``PayloadError`` if the file
    is not what its frame said (too short, over ``limit``)."""
    if size > limit:
        raise PayloadError(f"a payload of {size} bytes is over the limit of {limit}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise PayloadError("a payload descriptor is not a memfd") from None
    if seals & _SEALS != _SEALS:
        raise PayloadError("a payload memfd is not sealed against change")
    if os.fstat(fd).st_size < size:
        raise PayloadError("a payload file is shorter than its frame says")
    # Every page written, none a hole: the sender paid (in its own memory limit) for what
    # this side is about to copy.
    if size and os.lseek(fd, 0, os.SEEK_HOLE) < size:
        raise PayloadError("a payload memfd has holes (it was never written)")
    buffer = bytearray(size)
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        n = os.preadv(fd, [view[offset:]], offset)
        if n <= 0:
            raise PayloadError("a payload file shrank while it was read")
        offset += n
    return buffer


def payload(flags: int, body: bytes, fds: socket.socket | None) -> bytes | bytearray:
    """The logical payload of a frame, reading the memfd that precedes it when flagged."""
    if not flags & FLAG_FD:
        return body
    if fds is None:
        raise ProtocolError("a frame named a payload descriptor on a channel without any")
    fd = receive_fd(fds)
    try:
        (size,) = FD_REF.unpack_from(body)
        return read_payload(fd, size)
    finally:
        os.close(fd)
