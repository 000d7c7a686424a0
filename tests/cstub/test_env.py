"""The Python contract: library_path, sizes, and the environment a worker is started with."""

from __future__ import annotations

import pytest

from omni_cstub import library_path, parse_size, preload_env


def test_library_path_is_the_built_library() -> None:
    path = library_path()
    assert path.is_absolute()
    assert path.name == "libomnicuda.so"
    assert path.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("512MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("2gi", 2 << 30),
        (" 10 KiB ", 10240),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 GiBs", "-1", "1e9"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="is not a memory size"):
        parse_size(text)


def test_preload_env_names_the_library_quota_and_mode() -> None:
    env = preload_env("2GiB", mode="device", shm_name="omni-gpu-model-a")
    assert env == {
        "LD_PRELOAD": str(library_path()),
        "OMNI_CUDA_MODE": "device",
        "OMNI_GPU_MEMORY_LIMIT": str(2 << 30),
        "OMNI_GPU_SHM_NAME": "omni-gpu-model-a",
    }
    assert preload_env(None)["OMNI_GPU_MEMORY_LIMIT"] == "0"
