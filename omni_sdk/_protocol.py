"""The wire format between omni-runtime and a worker process.

Every message is one frame: a 16-byte header followed by ``length`` bytes of body.

    length  u32   bytes of body after the header
    version u8    PROTOCOL_VERSION; a peer refuses any other
    kind    u8    a ``Kind``
    flags   u16   ``FLAG_SHM``: the body names a shared-memory segment holding the payload
    id      u64   request id, echoed in the response

No pickle crosses the boundary: bodies are JSON or the raw bytes of the KServe v2 binary
tensor extension, so a worker in a venv with other library versions still understands them.
Payloads of ``shm_threshold`` bytes or more travel through a file in ``/dev/shm`` instead of
the socket; the receiver maps it and unlinks it at once.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import struct
from collections.abc import Iterator

__all__ = [
    "FLAG_SHM",
    "HEADER",
    "PROTOCOL_VERSION",
    "FrameReader",
    "Kind",
    "ProtocolError",
    "encode_frame",
    "read_shm",
    "write_shm",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<IBBHQ")
FLAG_SHM = 0x1
SHM_REF = struct.Struct("<Q")  # payload size, followed by the segment name in UTF-8
V2_PREFIX = struct.Struct("<I")  # Inference-Header-Content-Length, 0 for a plain JSON body
RESPONSE_PREFIX = struct.Struct("<HI")  # HTTP status, Inference-Header-Content-Length
SHM_DIR = "/dev/shm"
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


class ProtocolError(Exception):
    """The peer sent something this side cannot read."""


def encode_frame(kind: int, request_id: int, body: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(len(body), PROTOCOL_VERSION, kind, flags, request_id) + body


class FrameReader:
    """Splits a byte stream into ``(kind, flags, request_id, body)`` frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        offset = 0
        size = len(buffer)
        header_size = HEADER.size
        while size - offset >= header_size:
            length, version, kind, flags, request_id = HEADER.unpack_from(buffer, offset)
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {version}, this side speaks "
                    f"{PROTOCOL_VERSION}: install the same omni-sdk in the model's environment"
                )
            end = offset + header_size + length
            if end > size:
                break
            yield kind, flags, request_id, bytes(buffer[offset + header_size : end])
            offset = end
        if offset:
            del buffer[:offset]


class ShmSegments:
    """Names and writes the shared-memory files one side sends; the other side unlinks them."""

    __slots__ = ("_counter", "prefix", "threshold")

    def __init__(self, prefix: str, threshold: int = DEFAULT_SHM_THRESHOLD) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self._counter = 0

    def frame(self, kind: int, request_id: int, parts: list[bytes] | tuple[bytes, ...]) -> bytes:
        """One frame carrying ``parts``: inline when small, through a segment when large."""
        size = sum(len(p) for p in parts)
        if size < self.threshold:
            return encode_frame(kind, request_id, b"".join(parts))
        self._counter += 1
        name = f"{self.prefix}-{self._counter}"
        write_shm(name, parts, size)
        return encode_frame(kind, request_id, SHM_REF.pack(size) + name.encode(), FLAG_SHM)

    def cleanup(self) -> None:
        """Remove segments this prefix left behind (the receiver died before reading them)."""
        directory, _, stem = f"{SHM_DIR}/{self.prefix}".rpartition("/")
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(stem + "-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def write_shm(name: str, parts: list[bytes] | tuple[bytes, ...], size: int) -> None:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapped:
            offset = 0
            for part in parts:
                mapped[offset : offset + len(part)] = part
                offset += len(part)
    finally:
        os.close(fd)


def read_shm(body: bytes, prefix: str) -> memoryview:
    """Map the segment a ``FLAG_SHM`` body names, unlink it, and return its payload.

    Only names under the sender's own ``prefix`` are accepted: a peer may not make this side
    read, or unlink, anybody else's file in /dev/shm.
    """
    (size,) = SHM_REF.unpack_from(body)
    name = body[SHM_REF.size :].decode(errors="replace")
    if not name.startswith(prefix + "-") or "/" in name:
        raise ProtocolError(f"refusing shared-memory segment name {name!r}")
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.unlink(path)
        if size == 0:
            return memoryview(b"")
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return memoryview(mapped)


def payload(flags: int, body: bytes, prefix: str) -> bytes | memoryview:
    """The logical payload of a frame, following a shared-memory reference when flagged.

    ``prefix`` is the segment prefix the sender was given (``ShmSegments.prefix``).
    """
    return read_shm(body, prefix) if flags & FLAG_SHM else body
