from __future__ import annotations

import fcntl
import os
import socket

import pytest

from omni_sdk.wire import (
    FLAG_FD,
    HEADER,
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameReader,
    Kind,
    PayloadError,
    Payloads,
    ProtocolError,
    encode_frame,
    payload,
    read_payload,
    write_memfd,
)


def test_frames_split_across_reads() -> None:
    stream = encode_frame(Kind.RUN_JSON, 1, b'{"a": 1}') + encode_frame(Kind.PING, 2)
    reader = FrameReader()
    frames = []
    for i in range(len(stream)):  # one byte at a time
        frames.extend(reader.feed(stream[i : i + 1]))
    assert frames == [(Kind.RUN_JSON, 0, 1, b'{"a": 1}'), (Kind.PING, 0, 2, b"")]


def test_frames_read_whole_or_cut_anywhere_come_out_the_same() -> None:
    """Whole frames are cut straight out of a read; a frame cut by the end of a read waits
    for the rest: at every point of a cut, the same frames, as bytes."""
    stream = b"".join(
        encode_frame(kind, n, body)
        for n, (kind, body) in enumerate(
            [(Kind.INFER_V2, b"x" * 300), (Kind.PING, b""), (Kind.RUN_JSON, b'{"a": 1}')], 1
        )
    )
    expected = [(Kind.INFER_V2, 0, 1, b"x" * 300), (Kind.PING, 0, 2, b""),
                (Kind.RUN_JSON, 0, 3, b'{"a": 1}')]  # fmt: skip
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        frames = [*reader.feed(stream[:cut]), *reader.feed(stream[cut:])]
        frames += reader.feed(stream)  # and once more, whole, after them
        assert frames == expected + expected, cut
        assert all(type(body) is bytes for *_, body in frames)


def test_other_protocol_version_is_refused() -> None:
    frame = bytearray(encode_frame(Kind.PING, 1))
    frame[4] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="install the same omni-sdk"):
        list(FrameReader().feed(bytes(frame)))


def test_large_payloads_travel_as_sealed_memfds() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    named_before = set(os.listdir("/dev/shm"))
    with ours, theirs:
        payloads = Payloads(ours, threshold=1024)
        small = payloads.frame(Kind.RUN_JSON, 1, [b"x" * 10])
        assert len(small) == 16 + 10
        big = b"".join(bytes([i % 251]) for i in range(5000))
        frame = payloads.frame(Kind.RUN_JSON, 2, [big[:100], memoryview(big)[100:]])
        assert len(frame) < 100
        [(_, flags, _, body)] = FrameReader().feed(frame)
        assert flags & FLAG_FD
        assert bytes(payload(flags, body, theirs)) == big
        assert set(os.listdir("/dev/shm")) <= named_before  # no named file anywhere


def test_a_sealed_payload_cannot_be_shrunk_by_its_sender() -> None:
    fd = write_memfd([b"abc" * 1000], 3000)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_a_payload_that_is_not_what_its_frame_says_fails_alone() -> None:
    fd = write_memfd([b"abc"], 3)
    try:
        with pytest.raises(PayloadError, match="shorter"):
            read_payload(fd, 100)
        with pytest.raises(PayloadError, match="over the limit"):
            read_payload(fd, 3, limit=2)
    finally:
        os.close(fd)


def test_only_sealed_fully_written_memfds_are_read() -> None:
    """A peer may not make this side allocate and copy memory it never paid for."""
    unsealed = os.memfd_create("unsealed")
    sparse = os.memfd_create("sparse", os.MFD_ALLOW_SEALING)
    try:
        os.write(unsealed, b"abc")
        with pytest.raises(PayloadError, match="not sealed"):
            read_payload(unsealed, 3)
        os.ftruncate(sparse, 1 << 30)  # a gigabyte of nothing
        fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, 0xF)
        with pytest.raises(PayloadError, match="holes"):
            read_payload(sparse, 1 << 30)
    finally:
        os.close(unsealed)
        os.close(sparse)
    with open(os.devnull, "rb") as plain, pytest.raises(PayloadError, match="not a memfd"):
        read_payload(plain.fileno(), 0)


def test_a_frame_naming_a_descriptor_that_never_came_is_refused() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, pytest.raises(ProtocolError, match="never came"):
        payload(FLAG_FD, (3).to_bytes(8, "little"), theirs)


def test_an_overlong_frame_is_refused_before_it_is_buffered() -> None:
    header = HEADER.pack(MAX_FRAME + 1, PROTOCOL_VERSION, Kind.RUN_JSON, 0, 1)
    with pytest.raises(ProtocolError, match="over the limit"):
        list(FrameReader().feed(header))
