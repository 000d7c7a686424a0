from __future__ import annotations

import ctypes

import pytest


def cuda_initialises() -> bool:
    """True where the real driver's cuInit succeeds: the only place these tests run."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
    except OSError:
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if cuda_initialises():
        return
    skip = pytest.mark.skip(reason="no GPU: cuInit failed")
    for item in items:
        if "tests/gpu/" in str(item.path):
            item.add_marker(skip)
