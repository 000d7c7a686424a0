"""The system shared-memory registry, the rewriting of requests that name regions, and how the
runtime tells which user a client on this host runs as."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from omni_runtime.server.shared_memory import (
    SharedMemory,
    SharedMemoryError,
    object_name,
    peer_uid,
)
from omni_runtime.server.shm_tensors import request_from_regions, response_to_regions


@pytest.fixture
def memory(tmp_path: Path) -> Iterator[SharedMemory]:
    """A registry over ``tmp_path`` (standing in for /dev/shm), with small limits."""
    registry = SharedMemory(str(tmp_path), max_regions=3, max_total_bytes=100)
    yield registry
    registry.close()


def _object(folder: Path, name: str, data: bytes) -> str:
    (folder / name).write_bytes(data)
    return f"/{name}"


@pytest.mark.parametrize(
    "key", ["/../etc/shadow", "a/b", "/", "/..", ".", "", "/x\0y", "y" * 256, 7, None]
)
def test_a_key_is_one_name_that_shm_open_could_create(key: object) -> None:
    with pytest.raises(SharedMemoryError) as info:
        object_name(key)
    assert info.value.status == 400


def test_keys_as_clients_write_them() -> None:
    assert object_name("/input_simple") == "input_simple"
    assert object_name("input_simple") == "input_simple"
    assert object_name("/" + "y" * 255) == "y" * 255


def test_regions_count_and_bytes_are_limited(memory: SharedMemory, tmp_path: Path) -> None:
    key = _object(tmp_path, "obj", bytes(64))
    for name in ("a", "b"):
        memory.register(name, key, 0, 40, os.getuid())
    with pytest.raises(SharedMemoryError, match="limit of 100 registered bytes") as info:
        memory.register("c", key, 0, 40, os.getuid())
    assert info.value.status == 507
    memory.register("c", key, 0, 20, os.getuid())
    with pytest.raises(SharedMemoryError, match="3 regions are registered already"):
        memory.register("d", key, 0, 1, os.getuid())
    memory.unregister("a")
    memory.register("d", key, 0, 1, os.getuid())
    assert [r["name"] for r in memory.status()] == ["b", "c", "d"]


def test_the_object_must_be_the_clients(memory: SharedMemory, tmp_path: Path) -> None:
    key = _object(tmp_path, "theirs", bytes(8))
    os.chown(tmp_path / "theirs", 12345, 12345)
    with pytest.raises(SharedMemoryError, match="belongs to another user") as info:
        memory.register("r", key, 0, 8, 4242)
    assert info.value.status == 403
    memory.register("r", key, 0, 8, 12345)  # its owner may
    memory.register("s", key, 0, 8, 0)  # and root may name anything


def test_a_closed_descriptor_is_never_reused(memory: SharedMemory, tmp_path: Path) -> None:
    key = _object(tmp_path, "obj", bytes(range(16)))
    region = memory.register("r", key, 4, 8, os.getuid())
    assert memory.read(region, 2, 4) == bytes([6, 7, 8, 9])
    memory.write(region, 0, b"\xff\xff")
    assert (tmp_path / "obj").read_bytes()[4:6] == b"\xff\xff"
    memory.unregister()
    assert memory.status() == []
    with pytest.raises(OSError):
        os.fstat(region.fd)


def test_a_peer_on_loopback_is_found_with_its_user() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            with socket.create_connection((host, server.getsockname()[1])) as client:
                accepted, address = server.accept()
                with accepted:
                    port = server.getsockname()[1]
                    assert peer_uid((address[0], address[1]), port) == os.getuid()
                    assert client.getsockname()[1] == address[1]


@pytest.mark.parametrize("client", [None, ("10.1.2.3", 5000), ("example", 1), ("::2", 4)])
def test_a_peer_elsewhere_is_refused(client: tuple[str, int] | None) -> None:
    with pytest.raises(SharedMemoryError, match="clients on the same host") as info:
        peer_uid(client, 8000)
    assert info.value.status == 403


def test_a_request_keeps_its_other_binary_inputs_in_order(
    memory: SharedMemory, tmp_path: Path
) -> None:
    key = _object(tmp_path, "obj", b"ABCDEFGH")
    memory.register("r", key, 0, 8, os.getuid())
    header = {
        "inputs": [
            {"name": "a", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}},
            {
                "name": "b",
                "datatype": "UINT8",
                "shape": [4],
                "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4,
                               "shared_memory_offset": 2},
            },
            {"name": "c", "datatype": "UINT8", "shape": [1], "data": [9]},
            {"name": "d", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
        ],
        "outputs": [
            {"name": "x", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}
        ],
    }  # fmt: skip
    encoded = json.dumps(header).encode()
    body, length, plans = request_from_regions(memory, encoded + b"aaddd", len(encoded))
    rewritten = json.loads(body[:length])
    assert body[length:] == b"aaCDEFddd"
    assert rewritten["inputs"][1]["parameters"] == {"binary_data_size": 4}
    assert rewritten["outputs"][0]["parameters"] == {"binary_data": True}
    assert [p.output for p in plans] == ["x"]

    answer = {"outputs": [
        {"name": "y", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}},
        {"name": "x", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
    ]}  # fmt: skip
    head = json.dumps(answer).encode()
    status, length, body = response_to_regions(memory, "m", plans, (200, len(head), head + b"yxyz"))
    assert status == 200 and body[length:] == b"y"
    written = json.loads(body[:length])["outputs"][1]
    assert written["parameters"] == {"shared_memory_region": "r", "shared_memory_byte_size": 3}
    assert (tmp_path / "obj").read_bytes() == b"xyzDEFGH"


@pytest.mark.parametrize(
    "inputs",
    [
        [1, "x", None],
        [{"name": "a", "parameters": {"shared_memory_region": ["r"]}}],
        [{"name": "a", "parameters": {"shared_memory_region": "r",
                                      "shared_memory_byte_size": "8"}}],
        [{"name": "a", "parameters": {"shared_memory_region": "r",
                                      "shared_memory_byte_size": True}}],
        [{"name": "a", "datatype": ["FP32"], "shape": [2],
          "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}],
        [{"name": "a", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4,
                                      "shared_memory_offset": -1}}],
        [{"name": "a", "parameters": {"binary_data_size": -3}}],
    ],
)  # fmt: skip
def test_hostile_headers_are_refused_or_left_to_the_worker(
    memory: SharedMemory, tmp_path: Path, inputs: list[object]
) -> None:
    memory.register("r", _object(tmp_path, "obj", bytes(8)), 0, 8, os.getuid())
    body = json.dumps({"inputs": inputs, "outputs": [{"parameters": {}}, 5]}).encode()
    try:
        request_from_regions(memory, body, 0)
    except SharedMemoryError as exc:
        assert exc.status == 400


@pytest.mark.parametrize(
    "answer",
    [b"[]", b'{"outputs": 5}', b'{"outputs": [5]}', b'{"outputs": [{"name": ["x"]}]}', b"{"],
)
def test_an_answer_that_cannot_be_written_is_a_500(
    memory: SharedMemory, tmp_path: Path, answer: bytes
) -> None:
    memory.register("r", _object(tmp_path, "obj", bytes(8)), 0, 8, os.getuid())
    header = {"inputs": [], "outputs": [{"name": "x", "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 8}}]}  # fmt: skip
    _, _, plans = request_from_regions(memory, json.dumps(header).encode(), 0)
    status, _, body = response_to_regions(memory, "m", plans, (200, 0, answer))
    assert status == 500 and b"model 'm'" in body
