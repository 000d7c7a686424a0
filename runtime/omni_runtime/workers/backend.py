"""The live workers backend: sandboxed worker processes, pre-warmed processes, heartbeats.

The controller asks it for workers and tells it when one is ready; this module alone knows
that a worker is a process, that it may be forked from a pre-warmed one, and that a worker
which stops answering is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omni_runtime.config import SchedulerSettings, ServerSettings
from omni_runtime.discovery import ModelSpec
from omni_runtime.isolation import CgroupError, Isolation
from omni_runtime.isolation.plan import worker_environment
from omni_runtime.scheduler.backend import Worker
from omni_runtime.workers.prewarm import PrewarmedProcess, trusted_modules
from omni_runtime.workers.supervisor import WorkerProcess

__all__ = ["LocalWorkers"]

log = logging.getLogger("omni.scheduler")


class LocalWorkers:
    """Worker processes on this node, each in its sandbox and cgroup."""

    def __init__(
        self,
        settings: ServerSettings,
        scheduler: SchedulerSettings,
        isolation: Isolation | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.isolation = isolation or Isolation()
        self.prewarmed: dict[str, PrewarmedProcess] = {}  # the current one, by model
        self._prewarmed_all: set[PrewarmedProcess] = set()  # current and retiring ones
        self._next_prewarm = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def description(self) -> str:
        return self.isolation.description

    def worker(self, spec: ModelSpec) -> WorkerProcess:
        prewarmed = self.prewarmed.get(spec.name)
        if prewarmed is not None and not prewarmed.alive:
            prewarmed = None
        return WorkerProcess(spec, self.settings, self.isolation, prewarmed)

    def started(self, worker: Worker, memory_short: bool) -> None:
        if not isinstance(worker, WorkerProcess):
            return
        if self.scheduler.prewarm_timeout and not worker.spec.device.startswith("cuda"):
            self._prewarm(worker, memory_short)

    def reserved_host_bytes(self) -> int:
        return sum(p.memory_bytes() for p in self._prewarmed_all)

    # -- pre-warmed processes ------------------------------------------------------------

    def _prewarm(self, worker: WorkerProcess, memory_short: bool) -> None:
        """Keep a pre-warmed process for this worker's model, preloading what it used.

        One per model, not per environment: it runs inside the model's sandbox (its user, its
        view of the files, its network), which its forks share.
        """
        spec = worker.spec
        wanted = trusted_modules(worker.modules, spec.package_dir)
        current = self.prewarmed.get(spec.name)
        if current is not None and current.alive and set(wanted) <= set(current.preload):
            return
        if memory_short:
            return  # no process that only holds memory
        if current is not None:
            current.retire()
        preload = sorted(set(wanted) | set(current.preload if current else []))
        process = PrewarmedProcess(spec.python, preload, label=f"model '{spec.name}'")
        self.prewarmed[spec.name] = process
        self._prewarmed_all.add(process)
        isolation = self.isolation
        environment = Path(spec.python).parent.parent if spec.python != sys.executable else None
        if isolation.cgroups is not None:
            self._next_prewarm += 1
            try:
                process.cgroup = isolation.cgroups.create(
                    f"prewarm-{self._next_prewarm}", spec.resources
                )
            except (CgroupError, OSError) as exc:
                log.warning("pre-warmed process for model '%s': no cgroup: %s", spec.name, exc)

        def launcher(fd: int) -> list[str]:
            return isolation.launcher(
                model=spec.name,
                package=spec.package_dir,
                environment=environment,
                memory_limit=spec.resources.memory,
                network=spec.network == "host",
                cgroup=process.cgroup,
                keep_fds=(fd,),
                pid_namespace=False,  # its forks' pids are the ones the runtime sees
            )

        env = worker_environment(os.environ, spec.env, isolation.cache_dir(spec.name))

        async def start() -> None:
            try:
                await process.start(env, launcher)
            except OSError as exc:
                log.warning("no pre-warmed process for model '%s': %s", spec.name, exc)
                process.retired = True
                process.cleanup()
                return
            outside_stdlib = [m for m in preload if m not in sys.stdlib_module_names]
            log.info(
                "pre-warmed process for model '%s': pid %s, preloading %d modules (%s)",
                spec.name, process.process.pid if process.process else "?", len(preload),
                ", ".join(outside_stdlib) or "the standard library",
            )  # fmt: skip

        task = asyncio.create_task(start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reconcile(
        self, now: float, memory_short: bool, last_request: Callable[[str], float | None]
    ) -> None:
        """Retire a pre-warmed process when memory is short or its model has gone idle."""
        for process in list(self._prewarmed_all):
            if process.ended:
                process.cleanup()
                self._prewarmed_all.discard(process)
        for name, process in list(self.prewarmed.items()):
            if not process.alive:
                del self.prewarmed[name]  # retiring: tracked in _prewarmed_all until it ends
                continue
            last = last_request(name)
            idle = now - max(last or 0.0, process.started_at) >= self.scheduler.prewarm_timeout
            if memory_short or idle:
                why = "memory is short" if memory_short else "its model is idle"
                log.info("retiring the pre-warmed process for model '%s': %s", name, why)
                process.retire()

    # -- hung workers --------------------------------------------------------------------

    async def run(self, ready: Callable[[], list[Worker]]) -> None:
        """Kill workers that owe an answer and have said nothing for heartbeat_timeout."""
        timeout = self.settings.heartbeat_timeout
        interval = max(0.05, min(5.0, timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()  # the channels' clock
            for worker in ready():
                if isinstance(worker, WorkerProcess):
                    try:
                        _check_heartbeat(worker, now, timeout)
                    except Exception:  # one odd worker must not end the watch for all
                        log.exception("heartbeat check of model '%s' failed", worker.spec.name)

    async def close(self) -> None:
        for process in self._prewarmed_all:
            process.kill()
            process.cleanup()
        self.isolation.close()


def _check_heartbeat(worker: WorkerProcess, now: float, timeout: float) -> None:
    channel = worker.channel
    if channel is None or worker.hung_after:
        return
    silent = channel.silent_for(now)
    if silent > timeout:
        worker.hung_after = silent
        log.error(
            "model '%s': worker pid %s has not answered for %.0fs; killing it",
            worker.spec.name, worker.pid, silent,
        )  # fmt: skip
        worker.kill()
    else:
        channel.ping()
