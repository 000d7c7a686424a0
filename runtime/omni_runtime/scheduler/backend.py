"""What the scheduler needs of worker processes, so the same controller runs live and simulated.

The controller starts, stops, parks, wakes and measures replicas only through a
``WorkersBackend`` and the ``Worker`` objects it makes. The live backend
(``omni_runtime.workers.LocalWorkers``) spawns sandboxed processes; the simulated one
(``omni_runtime.scheduler.simulated``) applies fixed physics on a virtual clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler.stats import ComputeStats

__all__ = [
    "Clock",
    "LoadFailed",
    "Response",
    "StartTimings",
    "Worker",
    "WorkerGone",
    "WorkersBackend",
]

Clock = Callable[[], float]  # seconds, monotonic: time.monotonic live, virtual when simulated
Response = tuple[int, int, bytes]  # HTTP status, Inference-Header-Content-Length, body


class LoadFailed(Exception):
    """A worker did not become ready; the message says why, naming the model."""


class WorkerGone(Exception):
    """The worker's socket closed while requests were waiting on it."""


@dataclass(frozen=True)
class StartTimings:
    """Where a worker's start went, in seconds: the phases of a cold start."""

    spawn: float = 0.0  # exec, interpreter start, omni_sdk import, sandbox
    import_: float = 0.0  # the model package and its plugins
    load: float = 0.0  # Engine.load
    total: float = 0.0  # spawn to HELLO, as the runtime saw it

    @classmethod
    def from_hello(cls, hello: dict[str, Any], spawned_at: float, total: float) -> StartTimings:
        timings = hello.get("timings") or {}
        try:
            main = float(timings.get("main", spawned_at))
            return cls(
                spawn=max(0.0, main - spawned_at) + float(timings.get("sandbox", 0.0)),
                import_=float(timings.get("import", 0.0)),
                load=float(timings.get("load", hello.get("load_seconds", 0.0))),
                total=total,
            )
        except (TypeError, ValueError):  # an older worker: only the total is known
            return cls(total=total)


class Worker(Protocol):
    """One replica's process, as the controller and a model's dispatch see it."""

    spec: ModelSpec
    load_seconds: float  # how long its start took
    timings: StartTimings
    started_at: float
    forked: bool  # started from a pre-warmed process
    not_prewarmed: str  # why not, when its model's pre-warmed process refused
    hung_after: float  # set when it was killed for not answering
    oom_killed: bool

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has ended, else None."""

    async def start(self) -> None:
        """Start it and wait until it serves; raise ``LoadFailed`` saying why not."""

    def request(
        self, kind: int, parts: list[bytes], on_chunk: Callable[[bytes], None] | None = None
    ) -> asyncio.Future[Response]:
        """Send one request; the future resolves with its answer (``WorkerGone`` if it ends)."""

    def count_compute(self, stats: ComputeStats) -> None:
        """From now on, add the compute times its answers carry (decoding, running, encoding:
        Triton's compute_input, _infer, _output) to ``stats``."""

    def abandon(self, future: asyncio.Future[Response]) -> asyncio.Future[Response]:
        """The caller of a request left: tell the worker (CANCEL; a stream stops there, a
        request already running finishes).

        Returns a future that resolves when the worker has answered it after all, or ended:
        until then the request still holds its slot on the replica.
        """

    async def park(self) -> None:
        """Move its device memory to the host; the process stays."""

    async def wake(self) -> None:
        """Bring a parked replica's memory back to its device."""

    async def stop(self, timeout: float) -> None:
        """Ask it to finish and exit; kill it if it has not within ``timeout``."""

    def abort(self) -> None:
        """Stop a worker that may still be starting: its ``start`` raises ``LoadFailed``."""

    def kill(self) -> None: ...

    async def wait(self) -> int:
        """Its exit status, once it has ended."""

    def exit_reason(self, returncode: int | None) -> str:
        """How it ended, in words: "exceeded its memory limit of 2 GiB", say."""

    def memory_bytes(self) -> int:
        """Host memory it holds now (its working set, not page cache)."""

    def gpu_memory_bytes(self) -> int:
        """GPU memory it holds now."""


class WorkersBackend(Protocol):
    """Makes workers, and keeps what lives beside them (pre-warmed processes, heartbeats)."""

    @property
    def description(self) -> str:
        """What isolation the workers get, in words (``GET /v2``, ``doctor``)."""

    def worker(self, spec: ModelSpec) -> Worker:
        """A worker for one replica of ``spec``, not started yet."""

    def started(self, worker: Worker, memory_short: bool) -> None:
        """``worker`` became ready (live: keep a pre-warmed process for its model)."""

    def reserved_host_bytes(self) -> int:
        """Host memory the backend holds outside any replica (pre-warmed processes)."""

    def reconcile(
        self, now: float, memory_short: bool, last_request: Callable[[str], float | None]
    ) -> None:
        """Let go of what no longer earns its memory; called once per scheduler tick."""

    async def run(self, ready: Callable[[], list[Worker]]) -> None:
        """Watch the ready workers for as long as the controller runs (live: heartbeats)."""

    async def close(self) -> None:
        """Stop everything the backend started besides the workers."""
