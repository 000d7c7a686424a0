"""HTTP/2's frames and header blocks as ``http2.py`` reads and writes them (RFC 9113, 7541)."""

from __future__ import annotations

import struct
from typing import Any, cast

from hpack import Decoder, HPACKError

__all__ = ["BlockDecoder", "ProtocolError", "frame", "header_block", "header_frames"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x7, 0x8, 0xB
# Settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

_HEADER = struct.Struct(">IBI")  # length (24 bits) and type, flags, stream


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload) << 8 | kind, flags, stream) + payload


def _integer(value: int, prefix: int, first: int) -> bytes:
    """HPACK's integer with a ``prefix``-bit prefix, ``first`` holding the bits above it."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``headers`` HPACK-encoded as literals never indexed by the dynamic table (so the peer's
    decoder state never depends on ours): a block that can be cached and sent again."""
    out = bytearray()
    for name, value in headers:
        if name == b":status" and value == b"200":
            out.append(0x88)  # static table entry 8
            continue
        out += b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value
    return bytes(out)


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with ``code`` (GOAWAY)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def header_frames(stream_id: int, block: bytes, end: bool, max_frame: int) -> bytes:
    """HEADERS (and CONTINUATION where ``block`` is larger than ``max_frame``)."""
    flags = END_STREAM if end else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    frames = [frame(HEADERS, flags, stream_id, parts[0])]
    frames += [frame(CONTINUATION, 0, stream_id, p) for p in parts[1:-1]]
    frames.append(frame(CONTINUATION, END_HEADERS, stream_id, parts[-1]))
    return b"".join(frames)


class BlockDecoder:
    """A connection's HPACK decoder (``hpack``), remembering a few blocks.

    A client sends the same block again and again once its headers are in the dynamic table;
    a block that left the table as it was decodes the same way while the table stays so.
    """

    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = Decoder()
        self.decoder.max_header_list_size = max_header_list_size
        self.blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.state = self._state()

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        before = self._state()
        if before == self.state:
            cached = self.blocks.get(block)
            if cached is not None:
                return cached
        try:
            headers = cast(list[tuple[bytes, bytes]], self.decoder.decode(block, raw=True))
        except HPACKError as exc:
            raise ProtocolError(0x9, f"a header block that cannot be decoded: {exc}") from None
        after = self._state()
        if after != self.state:
            self.blocks.clear()
            self.state = after
        if before == after and len(block) <= 1024:
            if len(self.blocks) >= 16:
                self.blocks.clear()
            self.blocks[block] = headers
        return headers

    def _state(self) -> tuple[int, int, int]:
        table: Any = self.decoder.header_table
        entries = table.dynamic_entries
        return len(entries), id(entries[0]) if entries else 0, table.maxsize
