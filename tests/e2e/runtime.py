"""Start a real ``omni-runtime serve`` on a free port and wait for its ready line.

No read of its output blocks: a thread reads it, and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
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

_READY = re.compile(
    r"omni-runtime: (?:serving (\d+) of (\d+) models|routing for the fleet) at (http://\S+)"
)
_STOP_GRACE = 30.0  # seconds a runtime gets to stop after SIGTERM before it is killed


class RunningRuntime:
    """A started runtime and every line it printed so far (read by a thread of its own, so
    no test ever blocks on its output)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.url = ""  # set once the runtime says where it serves
        self.host_port = ""
        self.lines: list[str] = []
        self._ended = False  # its output reached EOF: no line will come
        self._condition = threading.Condition()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                with self._condition:
                    self.lines.append(line.rstrip("\n"))
                    self._condition.notify_all()
        finally:
            with self._condition:
                self._ended = True
                self._condition.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        """Block until the runtime prints a line matching ``pattern`` (a regex); fail after
        ``timeout`` seconds, or as soon as its output ends, naming what it printed last."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._condition:
            index = start
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return self.lines[index]
                    index += 1
                if self.process.poll() is not None:  # what it printed last is read soon
                    deadline = min(deadline, time.monotonic() + 2.0)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ended:
                    raise AssertionError(
                        f"runtime never printed {pattern!r} ({self._state(timeout)}); "
                        f"{self.last_lines()}"
                    )
                self._condition.wait(remaining)

    def last_lines(self, count: int = 40) -> str:
        with self._condition:
            lines = self.lines[-count:]
        if not lines:
            return "it printed nothing"
        return f"its last {len(lines)} lines:\n" + "\n".join(lines)

    def _state(self, timeout: float) -> str:
        returncode = self.process.poll()
        if returncode is None and self._ended:
            # Its output closed: it is most likely exiting; give it a moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = self.process.wait(2.0)
        if returncode is None and not self._ended:
            return f"still running after {timeout:g}s"
        if returncode is None:
            return "it closed its output"
        return f"it exited with status {returncode}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = _STOP_GRACE) -> int:
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
    command = [
        sys.executable, "-m", "omni_runtime.cli", "serve", *map(str, paths),
        "--port", "0", *(extra or []),
    ]  # fmt: skip
    with start(command, timeout=timeout, env=env, open_files=open_files) as running:
        yield running


@contextmanager
def start(
    command: list[str],
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    open_files: int | None = None,
) -> Iterator[RunningRuntime]:
    """Run ``command`` (a runtime) until it prints its ready line, at most ``timeout``
    seconds; stop it when the block ends. A block that fails prints the runtime's last lines;
    a runtime that is not ready in time is killed and the block fails, saying so."""

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        preexec_fn=limit if open_files is not None else None,
    )
    assert process.stdout is not None
    runtime = RunningRuntime(process)
    pump = threading.Thread(target=runtime._pump, daemon=True)
    pump.start()
    try:
        try:
            ready = runtime.wait_for_line(_READY.pattern, timeout)
        except AssertionError:
            state = runtime._state(timeout)
            process.kill()
            raise AssertionError(
                f"runtime did not become ready within {timeout:g}s ({state}), so it was "
                f"killed: {' '.join(command)}; {runtime.last_lines()}"
            ) from None
        runtime.url = _READY.search(ready).group(3)  # type: ignore[union-attr]
        runtime.host_port = runtime.url.removeprefix("http://")
        try:
            yield runtime
        except BaseException:  # a failed assertion, pytest-timeout's deadline, ^C
            print(f"runtime {' '.join(command)}: {runtime.last_lines()}", flush=True)
            raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_GRACE)
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


_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """The samples ``name`` of a /metrics page whose labels include ``labels``, summed (0 when
    there is none): ``metric(text, "omni_model_replicas", model="@test/echo")``."""
    total = 0.0
    for found, inside, value in _SAMPLE.findall(text):
        if found == name and labels.items() <= dict(_LABEL.findall(inside)).items():
            total += float(value)
    return total
