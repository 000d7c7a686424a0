"""The helper that starts runtimes: a runtime that hangs fails its test, it never hangs CI."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.runtime import start

READY = "omni-runtime: serving 0 of 0 models at http://127.0.0.1:9"


def _fake(script: str) -> list[str]:
    """A "runtime" that runs ``script`` (Python)."""
    return [sys.executable, "-c", script]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_runtime_that_prints_nothing_and_never_exits_fails_within_its_timeout(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    began = time.monotonic()
    with (
        pytest.raises(AssertionError, match=r"did not become ready within 2s \(still running") as e,
        start(_fake(hang), timeout=2),
    ):
        pytest.fail("a runtime that never said it was ready was handed to the test")
    assert time.monotonic() - began < 10
    assert "it printed nothing" in str(e.value)
    assert _gone(int(pid_file.read_text()))  # killed (and reaped), not left running


def test_a_runtime_that_exits_early_fails_at_once_with_its_last_lines() -> None:
    began = time.monotonic()
    with (
        pytest.raises(AssertionError, match=r"exited with status 3.*\n.*cannot bind") as e,
        start(_fake("print('omni-runtime: cannot bind'); raise SystemExit(3)"), timeout=60),
    ):
        pass
    assert time.monotonic() - began < 10
    assert "last 1 lines" in str(e.value)


def test_waiting_for_a_line_a_silent_runtime_never_prints_has_a_deadline() -> None:
    silent = f"import time; print({READY!r}, flush=True); time.sleep(600)"
    with start(_fake(silent), timeout=10) as runtime:
        assert runtime.url == "http://127.0.0.1:9"
        began = time.monotonic()
        with pytest.raises(AssertionError, match=r"never printed 'model .* ready' \(still running"):
            runtime.wait_for_line(r"model .* ready", timeout=1)
        assert time.monotonic() - began < 5
    assert runtime.process.returncode is not None  # stopped when the block ended


def test_a_failing_block_prints_the_runtimes_last_lines(capsys: pytest.CaptureFixture[str]) -> None:
    talker = (
        f"import time; print({READY!r}); print('worker said goodbye', flush=True); time.sleep(600)"
    )
    with pytest.raises(ZeroDivisionError), start(_fake(talker), timeout=10) as runtime:
        runtime.wait_for_line("goodbye", timeout=10)
        1 / 0  # noqa: B018  # any failure inside the block
    assert "worker said goodbye" in capsys.readouterr().out
    assert runtime.process.returncode is not None
