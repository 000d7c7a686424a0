"""Progress: rewritten in place on a terminal, plain lines in a pipe."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from omni_runtime.progress import StatusLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_status_line_is_rewritten_in_place_on_a_terminal() -> None:
    stream = Terminal()
    status = StatusLine(stream)
    status.update("omni on 1 GPUs: 90.00% within the SLO")
    status.update("omni on 2 GPUs: 100.00% within the SLO")
    status.close()
    written = stream.getvalue()
    assert written.count("\r\x1b[K") == 2 and written.count("\n") == 1
    assert written.endswith("\r\x1b[K  omni on 2 GPUs: 100.00% within the SLO\n")


def test_a_status_line_is_a_line_per_update_in_a_pipe() -> None:
    stream = io.StringIO()
    status = StatusLine(stream)
    status.update("first")
    status.update("second")
    status.close()
    assert stream.getvalue() == "  first\n  second\n"


def test_simulate_in_a_pipe_prints_a_plain_line_per_replay(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("time,model,duration,memory\n0,a,1,1GiB\n0.5,b,1,2GiB\n")
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(trace), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    replays = [line for line in done.stderr.splitlines() if "within the SLO" in line]
    assert replays and all(line.startswith("  ") for line in replays)
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
