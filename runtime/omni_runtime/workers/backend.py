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
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler.backend import Worker
from omni_runtime.workers.prewarm import PrewarmedProcess, trusted_modules
from omni_runtime.workers.supervisor import WorkerProcess

__all__ = ["LocalWorkers"]

log = logging.getLogger("omni.scheduler")
# Why a pre-warmed process gave up, as the metric's reason label: a module from outside the base
# layer, a thread a fork cannot carry, an exit before any fork, anything else.
REFUSAL_KINDS = frozenset({"outside_base", "threads", "exited", "failed"})


class LocalWorkers:
    """Worker processes on this node, each in its sandbox and cgroup."""

    def __init__(
        self,
        settings: ServerSettings,
        scheduler: SchedulerSettings,
        isolation: Isolation | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.isolation = isolation or Isolation()
        self.metrics = metrics
        self.prewarmed: dict[str, PrewarmedProcess] = {}  # the current one, by model
        # Why a model's last pre-warmed process refused, and what it was asked to preload:
        # the same list is not tried again, and the model's next start says why it is fresh.
        self.refused: dict[str, tuple[str, frozenset[str]]] = {}
        # Packages left out of a model's preloading: importing them started a thread.
        self.left_out: dict[str, set[str]] = {}
        self._prewarmed_all: set[PrewarmedProcess] = set()  # current and retiring ones
        self._next_prewarm = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def description(self) -> str:
        return self.isolation.description

    def worker(self, spec: ModelSpec) -> WorkerProcess:
        prewarmed = self.prewarmed.get(spec.name)
        if prewarmed is not None and prewarmed.made_for != (spec.python, spec.package_dir):
            # The model's package or environment changed (a new catalog entry, a rollout):
            # a process made for the old one would fork workers of the old code, or none.
            prewarmed.retire()
            del self.prewarmed[spec.name]
            prewarmed = None
        if prewarmed is not None and not prewarmed.alive:
            prewarmed = None
        worker = WorkerProcess(spec, self.settings, self.isolation, prewarmed)
        if prewarmed is None and spec.name in self.refused:
            worker.not_prewarmed = self.refused[spec.name][0]
        return worker

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
        wanted = trusted_modules(worker.modules, worker.spec.package_dir)
        self._keep_prewarmed(worker.spec, wanted, memory_short)

    def _keep_prewarmed(self, spec: ModelSpec, wanted: list[str], memory_short: bool) -> None:
        left_out = self.left_out.get(spec.name, set())
        wanted = [m for m in wanted if m.partition(".")[0] not in left_out]
        current = self.prewarmed.get(spec.name)
        if current is not None and current.alive and set(wanted) <= set(current.preload):
            return
        if memory_short:
            return  # no process that only holds memory
        refused = self.refused.get(spec.name)
        if refused is not None and set(wanted) <= refused[1]:
            return  # it would refuse again
        if current is not None:
            current.retire()
        earlier = [
            m
            for m in (current.preload if current else [])
            if m not in set(wanted) and m.partition(".")[0] not in left_out
        ]
        preload = [*wanted, *earlier]  # in the order the worker imported them
        process = PrewarmedProcess(spec.python, preload, label=f"model '{spec.name}'")
        process.made_for = (spec.python, spec.package_dir)
        process.on_refused = lambda process: self._refused(spec, process)
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
            packages = sorted({m.partition(".")[0] for m in preload} - set(sys.stdlib_module_names))
            log.info(
                "pre-warmed process for model '%s': pid %s, preloading %d modules (%s)",
                spec.name, process.process.pid if process.process else "?", len(preload),
                ", ".join(packages[:12]) + (", ..." if len(packages) > 12 else "")
                or "the standard library",
            )  # fmt: skip

        task = asyncio.create_task(start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self, spec: ModelSpec, process: PrewarmedProcess) -> None:
        model = spec.name
        reason = process.refused or "no reason given"
        kind = process.refused_kind if process.refused_kind in REFUSAL_KINDS else "failed"
        self.refused[model] = (reason, frozenset(process.preload))
        if self.prewarmed.get(model) is process:
            del self.prewarmed[model]
        if self.metrics is not None:
            self.metrics.prewarm_refusals.labels(model, kind).inc()
        left_out = self.left_out.setdefault(model, set())
        culprit = process.refused_module
        named = any(m.partition(".")[0] == culprit for m in process.preload)
        if kind == "threads" and named and culprit not in left_out and len(left_out) < 3:
            # Once more without that package: its workers import it themselves. (Three times
            # at most: the process runs the model's code and could blame one after another.)
            left_out.add(culprit)
            del self.refused[model]  # a new list: not refused yet
            log.info("model '%s': pre-warming again without %s (%s)", model, culprit, reason)
            self._keep_prewarmed(spec, process.preload, memory_short=False)
            return
        log.warning(
            "model '%s': its pre-warmed process will not fork workers: %s; its next replicas "
            "start fresh",
            model, reason,
        )  # fmt: skip

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
