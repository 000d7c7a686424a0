"""Triton's system shared-memory extension: regions a client on this host registers by the
key of a POSIX shared-memory object (``/dev/shm/<key>``), then names in infer requests.

The runtime runs as root, so what a key may reach is narrow. A key is one file name (an
optional leading ``/``, no other ``/``, not ``.`` or ``..``, no NUL, at most 255 bytes); it is
opened beneath ``/dev/shm`` without following a symbolic link, and must be a regular file on
that file system. Only a client on the same host can register: its connection's peer address
must be a loopback address, and the object must belong to the user whose socket that is (found
in ``/proc/net/tcp``), so a client reaches only memory it could have mapped itself (root may
name any object). Regions are kept as open descriptors, never mapped: they are read with
``pread`` and written with ``pwrite``, so a client that shrinks its object afterwards gets an
error naming the region instead of crashing the runtime.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAX_REGIONS", "MAX_TOTAL_BYTES", "Region", "SharedMemory", "SharedMemoryError"]

SHM_DIR = "/dev/shm"
MAX_REGIONS = 1024  # registered at once, all clients together
MAX_TOTAL_BYTES = 1 << 40  # bytes registered at once (1 TiB), all regions together
_MAX_KEY = 255  # NAME_MAX
_CHUNK = 1 << 30  # one pread/pwrite at most (Linux moves at most ~2 GiB per call)


class SharedMemoryError(Exception):
    """A request about shared memory that cannot be honoured; ``status`` is the HTTP status
    (400 bad argument, 403 not this client's, 404 no such region, 409 name taken, 507 full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


def object_name(key: Any) -> str:
    """The file name under /dev/shm that ``key`` names (as ``shm_open`` takes it), or an
    error saying why no client could have created it."""
    if not isinstance(key, str) or not key:
        raise SharedMemoryError(400, "'key' must be a non-empty string such as '/input_data'")
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise SharedMemoryError(
            400,
            f"invalid shared memory key {key!r}: a key is one name, as shm_open takes it "
            "(an optional leading '/', no other '/', not '.' or '..')",
        )
    if len(name.encode()) > _MAX_KEY:
        raise SharedMemoryError(400, f"shared memory key is longer than {_MAX_KEY} bytes")
    return name


def _whole(value: Any, field: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SharedMemoryError(
            400, f"failed to register shared memory region '{name}': '{field}' must be a "
            f"whole number >= 0, not {value!r}",
        )  # fmt: skip
    return value


class SharedMemory:
    """The regions registered on this node, by name (shared by HTTP and gRPC)."""

    def __init__(
        self,
        directory: str = SHM_DIR,
        max_regions: int = MAX_REGIONS,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        max_request_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_regions = max_regions
        self.max_total_bytes = max_total_bytes
        # An infer request's inputs read from regions, with the rest of its body, come to at
        # most this (the server's max_body_size), checked before anything is read.
        self.max_request_bytes = max_request_bytes
        self.regions: dict[str, Region] = {}

    # -- register, status, unregister ----------------------------------------------------

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any, client_uid: int) -> Region:
        """Open ``key``'s object for ``name``, on behalf of a client running as ``client_uid``."""
        if not isinstance(name, str) or not name or len(name) > 1024 or "\0" in name:
            raise SharedMemoryError(400, "a region's name must be 1 to 1024 characters")
        if name in self.regions:  # Triton's words
            raise SharedMemoryError(409, f"shared memory region '{name}' already in manager")
        file_name = object_name(key)
        offset = _whole(offset, "offset", name)
        byte_size = _whole(byte_size, "byte_size", name)
        if byte_size == 0:
            raise SharedMemoryError(
                400, f"failed to register shared memory region '{name}': 'byte_size' is 0"
            )
        if len(self.regions) >= self.max_regions:
            raise SharedMemoryError(
                507, f"cannot register shared memory region '{name}': {self.max_regions} "
                "regions are registered already (the most a server keeps); unregister some",
            )  # fmt: skip
        total = sum(r.byte_size for r in self.regions.values())
        if total + byte_size > self.max_total_bytes:
            raise SharedMemoryError(
                507, f"cannot register shared memory region '{name}': {byte_size} bytes more "
                f"would pass the server's limit of {self.max_total_bytes} registered bytes "
                f"({total} now); unregister some",
            )  # fmt: skip
        fd = self._open(name, key, file_name, offset + byte_size, client_uid)
        region = Region(name, key, offset, byte_size, fd)
        self.regions[name] = region
        return region

    def _open(self, name: str, key: str, file_name: str, end: int, client_uid: int) -> int:
        unable = f"Unable to open shared memory region: '{key}'"  # Triton's words, then why
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryError(400, f"{unable}: {self.directory}: {exc.strerror}") from None
        try:
            fd = os.open(file_name, flags, dir_fd=directory)
            home = os.fstat(directory).st_dev
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise SharedMemoryError(400, f"{unable}: {why}") from None
        finally:
            os.close(directory)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_dev != home:
                raise SharedMemoryError(
                    400, f"{unable}: not a shared memory object in {self.directory}"
                )
            if client_uid != 0 and info.st_uid != client_uid:
                raise SharedMemoryError(
                    403, f"{unable}: the object belongs to another user than the client's "
                    f"(uid {info.st_uid}, the client runs as uid {client_uid})",
                )  # fmt: skip
            if end > info.st_size:  # Triton's words, then the sizes
                raise SharedMemoryError(
                    400, f"failed to register shared memory region '{name}': invalid args "
                    f"(offset + byte_size is {end} bytes; the object '{key}' has "
                    f"{info.st_size})",
                )  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        return fd

    def status(self, name: str = "") -> list[dict[str, Any]]:
        if not name:
            return [region.status() for region in self.regions.values()]
        return [self.get(name).status()]

    def unregister(self, name: str = "") -> None:
        """Forget region ``name`` (every region when empty); an unknown name is no error."""
        names = [name] if name else list(self.regions)
        for each in names:
            region = self.regions.pop(each, None)
            if region is not None:
                os.close(region.fd)

    def close(self) -> None:
        self.unregister()

    # -- reading and writing -------------------------------------------------------------

    def get(self, name: Any) -> Region:
        region = self.regions.get(name) if isinstance(name, str) else None
        if region is None:  # Triton's words
            raise SharedMemoryError(404, f"Unable to find system shared memory region: '{name}'")
        return region

    def read(self, region: Region, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` within ``region`` (bounds checked by the caller)."""
        start = region.offset + offset
        parts = []
        done = 0
        while done < size:
            try:
                part = os.pread(region.fd, min(size - done, _CHUNK), start + done)
            except OSError as exc:
                message = f"shared memory region '{region.name}' cannot be read: {exc.strerror}"
                raise SharedMemoryError(400, message) from None
            if not part:
                raise SharedMemoryError(
                    400, f"shared memory region '{region.name}' is shorter than it was when "
                    f"registered: its object '{region.key}' was truncated; register it again",
                )  # fmt: skip
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, region: Region, offset: int, data: bytes | memoryview) -> None:
        start = region.offset + offset
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(region.fd, view[done : done + _CHUNK], start + done)


# -- who the client is -------------------------------------------------------------------


def peer_uid(client: tuple[str, int] | None, server_port: int | None) -> int:
    """The uid owning the client's end of a TCP connection on this host, from
    ``/proc/net/tcp`` and ``tcp6``; a ``SharedMemoryError`` when the client is not on a
    loopback address or its socket cannot be found."""
    refusal = (
        "system shared memory is for clients on the same host: connect through a loopback "
        "address (127.0.0.1 or ::1)"
    )
    if client is None:
        raise SharedMemoryError(403, refusal)
    host, port = client
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise SharedMemoryError(403, refusal) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_loopback:
        raise SharedMemoryError(403, refusal)
    wanted = {_proc_address(address, port)}
    if isinstance(address, ipaddress.IPv4Address):  # as a dual-stack socket shows it
        wanted.add(_proc_address(ipaddress.IPv6Address(f"::ffff:{address}"), port))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[1] not in wanted or fields[3] != "01":  # ESTABLISHED
                continue
            if server_port is not None and int(fields[2].rpartition(":")[2], 16) != server_port:
                continue
            return int(fields[7])
    raise SharedMemoryError(
        403, "cannot tell which user the client runs as (its socket is not in /proc/net/tcp)"
    )


def _proc_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """An address and port as /proc/net/tcp writes them: 32-bit words in host order, hex."""
    packed = address.packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"
