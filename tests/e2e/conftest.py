from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.runtime import RunningRuntime, serve


@pytest.fixture(scope="module")
def runtime(echo_package: Path) -> Iterator[RunningRuntime]:
    broken = echo_package.parent / "broken-model"
    with serve(echo_package, broken, extra=["--max-body-size", "1MiB"]) as running:
        yield running


@pytest.fixture()
def http(runtime: RunningRuntime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=runtime.url, timeout=30) as client:
        yield client
