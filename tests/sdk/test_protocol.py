from __future__ import annotations

import os

import pytest

from omni_sdk._protocol import (
    FLAG_SHM,
    PROTOCOL_VERSION,
    FrameReader,
    Kind,
    ProtocolError,
    ShmSegments,
    encode_frame,
    payload,
)


def test_frames_split_across_reads() -> None:
    stream = encode_frame(Kind.RUN_JSON, 1, b'{"a": 1}') + encode_frame(Kind.PING, 2)
    reader = FrameReader()
    frames = []
    for i in range(len(stream)):  # one byte at a time
        frames.extend(reader.feed(stream[i : i + 1]))
    assert frames == [(Kind.RUN_JSON, 0, 1, b'{"a": 1}'), (Kind.PING, 0, 2, b"")]


def test_other_protocol_version_is_refused() -> None:
    frame = bytearray(encode_frame(Kind.PING, 1))
    frame[4] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="install the same omni-sdk"):
        list(FrameReader().feed(bytes(frame)))


def test_large_payloads_travel_through_shared_memory() -> None:
    segments = ShmSegments(f"omni-test-{os.getpid()}", threshold=1024)
    small = segments.frame(Kind.RUN_JSON, 1, [b"x" * 10])
    assert len(small) == 16 + 10
    big = b"".join(bytes([i % 251]) for i in range(5000))
    frame = segments.frame(Kind.RUN_JSON, 2, [big[:100], big[100:]])
    assert len(frame) < 100
    [(_, flags, _, body)] = FrameReader().feed(frame)
    assert flags & FLAG_SHM
    assert bytes(payload(flags, body, segments.prefix)) == big
    # The receiver unlinked the segment as it mapped it.
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"omni-test-{os.getpid()}")]


def test_cleanup_removes_unread_segments() -> None:
    segments = ShmSegments(f"omni-test-{os.getpid()}-c", threshold=1)
    segments.frame(Kind.RUN_JSON, 1, [b"abc"])
    assert [n for n in os.listdir("/dev/shm") if n.startswith(segments.prefix)]
    segments.cleanup()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(segments.prefix)]


def test_segment_names_cannot_escape_shm() -> None:
    for name in (b"../etc/passwd", b"omni-123-9-w-1", b"omni-123-1-w/../x"):
        body = (3).to_bytes(8, "little") + name
        with pytest.raises(ProtocolError, match="refusing"):
            payload(FLAG_SHM, body, "omni-123-1-w")
