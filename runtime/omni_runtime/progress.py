"""What a long step at start shows: on a terminal a display that updates in place, in a pipe or
a log file plain log lines.

Environment builds and discovery report through the same objects, so ``serve`` and ``models``
show one display for both; ``simulate`` reports its replays through a ``StatusLine``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from typing import Any, Protocol, TextIO

__all__ = [
    "BuildProgress",
    "DiscoveryProgress",
    "LoggedProgress",
    "StatusLine",
    "TerminalProgress",
]

log = logging.getLogger("omni.progress")


class BuildProgress(Protocol):
    """Told when a package's environment starts and finishes building."""

    def started(self, package: str, installs: str) -> None: ...
    def finished(self, package: str, seconds: float, ok: bool) -> None: ...


class DiscoveryProgress(Protocol):
    """Told when a package's discovery (importing it, listing its engines) starts and ends."""

    def discovering(self, package: str) -> None: ...
    def discovered(self, package: str, seconds: float, models: list[str], error: str) -> None: ...


def _models(models: list[str]) -> str:
    return f"{len(models)} model{'s' * (len(models) != 1)} ({', '.join(models)})"


class LoggedProgress:
    """Progress as log lines: what a log file or a pipe gets."""

    def started(self, package: str, installs: str) -> None:
        log.info("environment for %s: building (installs %s)", package, installs)

    def finished(self, package: str, seconds: float, ok: bool) -> None:
        outcome = "built" if ok else "failed"
        log.info("environment for %s: %s in %.1fs", package, outcome, seconds)

    def discovering(self, package: str) -> None:
        log.info("discovering %s", package)

    def discovered(self, package: str, seconds: float, models: list[str], error: str) -> None:
        if error:
            log.info("discovered %s in %.1fs: failed", package, seconds)
        else:
            log.info("discovered %s in %.1fs: %s", package, seconds, _models(models))


class TerminalProgress:
    """Progress as a live rich display: one line per environment being built and per package
    being discovered, each updated in place when it ends."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def started(self, package: str, installs: str) -> None:
        self._tasks[f"env:{package}"] = self._progress.add_task(
            f"environment for {package}: installing {installs}", total=1
        )

    def finished(self, package: str, seconds: float, ok: bool) -> None:
        outcome = "[green]built[/]" if ok else "[red]failed[/]"
        self._progress.update(
            self._tasks[f"env:{package}"],
            description=f"environment for {package}: {outcome}",
            completed=1,
        )

    def discovering(self, package: str) -> None:
        self._tasks[f"discover:{package}"] = self._progress.add_task(
            f"discovering {package}", total=1
        )

    def discovered(self, package: str, seconds: float, models: list[str], error: str) -> None:
        found = "[red]failed[/]" if error else f"[green]{_models(models)}[/]"
        self._progress.update(
            self._tasks[f"discover:{package}"],
            description=f"discovered {package} in {seconds:.1f}s: {found}",
            completed=1,
        )


class StatusLine:
    """One line of status: rewritten in place on a terminal, a line per update in a pipe."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "  ") -> None:
        self.stream = stream or sys.stderr
        self.prefix = prefix
        self.live = self.stream.isatty()
        self._shown = False

    def update(self, text: str) -> None:
        line = self.prefix + text
        if not self.live:
            print(line, file=self.stream, flush=True)
            return
        width = shutil.get_terminal_size().columns
        self.stream.write("\r\x1b[K" + line[: max(1, width - 1)])
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Leave the last line on a terminal, and end it."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
