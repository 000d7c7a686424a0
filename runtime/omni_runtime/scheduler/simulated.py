"""The simulated workers backend: the fixed physics ``omni-runtime simulate`` runs the
controller against, on a virtual clock (``VirtualTimeLoop``).

The physics (docs/scheduling.md):

- **CPU node** (no GPUs): a replica holds its model's ``memory`` of host memory, starts in
  ``start_seconds``, and serves ``concurrency`` requests at once, each taking its duration.
- **GPU node**: a replica holds its model's ``memory`` on its GPU. A fresh start loads it from
  disk (memory / ``disk_gbps``); waking a parked one brings it back over PCIe (memory /
  ``pcie_gbps``). A GPU runs at most ``max_batch`` requests at once, over all its replicas.
  The scheduler may promise a GPU ``gpu_overcommit`` times its memory; what does not fit in the
  card's real memory lives on the host, and a request for a replica whose memory is not on the
  card waits while it is paged in (memory / ``pcie_gbps``), pushing out the least recently
  used idle replicas.
- A request *starts* when it holds its slot (and its memory is on the card); its wait, start
  minus arrival, is what the SLO is checked against.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler.backend import LoadFailed, Response, StartTimings, Worker, WorkerGone
from omni_runtime.scheduler.stats import ComputeStats

__all__ = ["Physics", "SimulatedWorker", "SimulatedWorkers"]

_GB = 1e9
_OK: Response = (200, 0, b"{}")


@dataclass(frozen=True)
class Physics:
    """What every simulated replica obeys."""

    gpu_memory: int = 80 << 30  # each GPU's real memory
    max_batch: int = 16  # requests one GPU runs at once
    pcie_gbps: float = 25.0
    disk_gbps: float = 2.0
    start_seconds: float = 0.2  # a start on a CPU node
    concurrency: int = 1  # requests one CPU replica runs at once


class _Gpu:
    """One card: its slots and which replicas' memory is on it now (least recent first)."""

    def __init__(self, physics: Physics) -> None:
        self.physics = physics
        self.slots = asyncio.Semaphore(physics.max_batch)
        self.on_card: OrderedDict[SimulatedWorker, int] = OrderedDict()
        self.used = 0  # bytes on the card: the sum of on_card's values

    def touch(self, worker: SimulatedWorker) -> float:
        """Put the worker's memory on the card; the seconds that takes (0 if it is there)."""
        if worker in self.on_card:
            self.on_card.move_to_end(worker)
            return 0.0
        need = worker.gpu_bytes
        if self.used + need > self.physics.gpu_memory:
            for other in list(self.on_card):
                if self.used + need <= self.physics.gpu_memory:
                    break
                if not other.running:
                    self.leave(other)  # its pages go to the host
        self.on_card[worker] = need
        self.used += need
        return need / (self.physics.pcie_gbps * _GB)

    def leave(self, worker: SimulatedWorker) -> None:
        self.used -= self.on_card.pop(worker, 0)


class SimulatedWorkers:
    """Makes ``SimulatedWorker`` replicas; knows each request's duration and arrival."""

    description = "simulated workers: no processes, no isolation"

    def __init__(
        self,
        physics: Physics,
        durations: list[float],
        clock: Callable[[], float],
        gpus: list[str],
        footprints: dict[str, int] | None = None,
    ) -> None:
        self.physics = physics
        # What a replica of each model really holds (the trace's memory), whatever it
        # declares in resources: the controller measures this, as it measures a live worker.
        self.footprints = footprints or {}
        self.durations = durations  # by request index
        self.arrivals = [math.inf] * len(durations)  # set as each request arrives
        self.waits = [math.inf] * len(durations)  # start - arrival, once started
        self.clock = clock
        self.gpus = {name: _Gpu(physics) for name in gpus}
        self._ids = itertools.count(1)

    def worker(self, spec: ModelSpec) -> SimulatedWorker:
        return SimulatedWorker(self, spec, next(self._ids))

    def started(self, worker: Worker, memory_short: bool) -> None:
        return None

    def reserved_host_bytes(self) -> int:
        return 0

    def reconcile(
        self, now: float, memory_short: bool, last_request: Callable[[str], float | None]
    ) -> None:
        return None

    async def run(self, ready: Callable[[], list[Worker]]) -> None:
        return None

    async def close(self) -> None:
        return None


class SimulatedWorker:
    """One simulated replica: starts, serves by sleeping on the virtual clock, parks, wakes."""

    def __init__(self, backend: SimulatedWorkers, spec: ModelSpec, id: int) -> None:
        self.backend = backend
        self.spec = spec
        self.id = id
        self.load_seconds = 0.0
        self.timings = StartTimings()
        self.started_at = 0.0
        self.forked = False
        self.not_prewarmed = ""
        self.hung_after = 0.0
        self.oom_killed = False
        self.running = 0
        self._serving: dict[asyncio.Future[Response], asyncio.Task[Response]] = {}
        self._returncode: int | None = None
        self._ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._starting: asyncio.Future[None] | None = None
        self._aborted = False
        self._slots = asyncio.Semaphore(max(1, backend.physics.concurrency))
        self._gpu = backend.gpus.get(_gpu_key(spec.device)) if spec.device != "cpu" else None
        on_gpu = self._gpu is not None
        declared = spec.resources.gpu_memory if on_gpu else spec.resources.memory
        footprint = backend.footprints.get(spec.name, declared)
        self.gpu_bytes = footprint if on_gpu else 0
        self.host_bytes = 0 if on_gpu else footprint

    def __hash__(self) -> int:
        return self.id

    @property
    def pid(self) -> int | None:
        return self.id

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def start(self) -> None:
        physics = self.backend.physics
        self.started_at = self.backend.clock()
        if self._gpu is not None:
            seconds = self.gpu_bytes / (physics.disk_gbps * _GB)
        else:
            seconds = physics.start_seconds
        self._starting = asyncio.ensure_future(asyncio.sleep(seconds))
        try:
            await self._starting
        except asyncio.CancelledError:
            self._aborted = True
        if self._aborted:
            self._end(-9)
            raise LoadFailed(f"model '{self.spec.name}': stopped while it started")
        if self._gpu is not None:
            self._gpu.touch(self)  # loaded onto the card: no page-in to pay on top
        self.load_seconds = seconds
        self.timings = StartTimings(load=seconds, total=seconds)

    def request(
        self, kind: int, parts: list[bytes], on_chunk: Callable[[bytes], None] | None = None
    ) -> asyncio.Future[Response]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        if self._returncode is not None:
            future.set_exception(WorkerGone(f"model '{self.spec.name}': its worker ended"))
            return future
        task = loop.create_task(self._serve(int(parts[0])))
        task.add_done_callback(lambda t: _settle(future, t))
        self._serving[future] = task
        task.add_done_callback(lambda _: self._serving.pop(future, None))
        return future

    async def _serve(self, index: int) -> Response:
        backend = self.backend
        gpu = self._gpu
        if gpu is None:
            async with self._slots:  # --concurrency requests at once on a CPU replica
                backend.waits[index] = backend.clock() - backend.arrivals[index]
                await asyncio.sleep(backend.durations[index])
            return _OK
        async with gpu.slots:  # --max-batch requests at once over the GPU's replicas
            self.running += 1
            try:
                page_in = gpu.touch(self)
                if page_in:
                    await asyncio.sleep(page_in)
                backend.waits[index] = backend.clock() - backend.arrivals[index]
                await asyncio.sleep(backend.durations[index])
            finally:
                self.running -= 1
        return _OK

    def count_compute(self, stats: ComputeStats) -> None:
        """Its answers carry no compute times: simulated physics has no phases."""

    def abandon(self, future: asyncio.Future[Response]) -> asyncio.Future[Response]:
        """Its caller left; like a sync worker, it finishes the request all the same."""
        task = self._serving.get(future)
        if task is None:
            return future
        settled: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def answered(_: asyncio.Task[Response]) -> None:
            if not settled.done():
                settled.set_result(_OK)

        task.add_done_callback(answered)
        return settled

    async def park(self) -> None:
        if self._gpu is not None:
            self._gpu.leave(self)

    async def wake(self) -> None:
        if self._gpu is not None:
            seconds = self._gpu.touch(self)
            if seconds:
                await asyncio.sleep(seconds)

    async def stop(self, timeout: float) -> None:
        self._end(0)

    def abort(self) -> None:
        """Stopped while it may still be starting; a started one is killed, as live."""
        self._aborted = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        else:
            self._end(-9)

    def kill(self) -> None:
        self.abort()
        self._end(-9)

    async def wait(self) -> int:
        return await self._ended

    def exit_reason(self, returncode: int | None) -> str:
        return "was stopped" if returncode == 0 else "was killed"

    def memory_bytes(self) -> int:
        return self.host_bytes

    def gpu_memory_bytes(self) -> int:
        return self.gpu_bytes

    def _end(self, returncode: int) -> None:
        if self._returncode is not None:
            return
        self._returncode = returncode
        if self._gpu is not None:
            self._gpu.leave(self)
        gone = WorkerGone(f"model '{self.spec.name}': its worker ended")
        for future, task in list(self._serving.items()):  # what it ran is lost, as live
            task.cancel()
            if not future.done():
                future.set_exception(gone)
        self._ended.set_result(returncode)


def _settle(future: asyncio.Future[Response], task: asyncio.Task[Response]) -> None:
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        future.set_result(task.result())


def _gpu_key(device: str) -> str:
    return "cuda:0" if device == "cuda" else device
