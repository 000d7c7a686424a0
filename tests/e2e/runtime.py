"""Start a real ``omni-runtime serve`` on a free port and wait for its ready line."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_READY = re.compile(r"omni-runtime: serving (\d+) of (\d+) models at (http://\S+)")


class RunningRuntime:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.host_port = url.removeprefix("http://")
        self.lines: list[str] = []
        self._condition = threading.Condition()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._condition:
                self.lines.append(line.rstrip("\n"))
                self._condition.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        """Block until the runtime prints a line matching ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._condition:
            index = start
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return self.lines[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"runtime never printed {pattern!r}; last lines:\n"
                        + "\n".join(self.lines[-30:])
                    )
                self._condition.wait(remaining)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextmanager
def serve(
    *paths: Path,
    extra: list[str] | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    open_files: int | None = None,
) -> Iterator[RunningRuntime]:
    """The runtime serving ``paths``, its environment ours plus ``env``; ``open_files``: its
    hard limit of open descriptors (RLIMIT_NOFILE), else ours."""

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    command = [
        sys.executable, "-m", "omni_runtime.cli", "serve", *map(str, paths),
        "--port", "0", *(extra or []),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        preexec_fn=limit if open_files is not None else None,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    url = None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        match = _READY.search(line)
        if match:
            url = match.group(3)
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        process.kill()
        process.wait()
        process.stdout.close()
        raise AssertionError("runtime did not become ready:\n" + "\n".join(lines[-40:]))
    runtime = RunningRuntime(process, url)
    runtime.lines.extend(lines)
    pump = threading.Thread(target=runtime._pump, daemon=True)
    pump.start()
    try:
        yield runtime
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pump.join(5)
        process.stdout.close()


def worker_deaths(metrics: str) -> float:
    """Workers that crashed, were OOM-killed or hung, over all models, from the /metrics page."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("omni_model_evictions_total{") and any(
            f'reason="{reason}"' in line for reason in ("crash", "oom", "hung")
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total
