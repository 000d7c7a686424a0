"""The controller and a model's queue (``ServedModel``) on a virtual clock, with simulated
workers: the code that serves live, driven exactly as ``omni-runtime simulate`` drives it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from omni_runtime.config import SchedulerSettings, ServerSettings
from omni_runtime.discovery import ModelSpec
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import Controller, ModelState, ModelUnavailable, ServedModel
from omni_runtime.scheduler.backend import LoadFailed
from omni_runtime.scheduler.simulated import Physics, SimulatedWorker, SimulatedWorkers
from omni_runtime.scheduler.virtual_time import VirtualTimeLoop
from omni_sdk import Resources, Scaling
from omni_sdk.wire import Kind

MB = 1_000_000


def spec(name: str, memory: int = 100 * MB, **scaling: Any) -> ModelSpec:
    return ModelSpec(
        name=name, task="", description="", package=name, package_dir=Path("/nonexistent"),
        python="", engine_class="test", inputs=[], outputs=[], input_schema={},
        output_schema={}, resources=Resources(memory=memory), scaling=Scaling(**scaling),
    )  # fmt: skip


class Node:
    """A controller over simulated workers, and a way to send it requests."""

    def __init__(
        self,
        *specs: ModelSpec,
        host_memory: int = 10_000 * MB,
        start_seconds: float = 0.5,
        backend: type[SimulatedWorkers] = SimulatedWorkers,
        **scheduler: Any,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.backend = backend(Physics(start_seconds=start_seconds), [], self.loop.time, [])
        self.metrics = Metrics()
        self.controller = Controller(
            specs,
            ServerSettings(),
            self.metrics,
            self.backend,
            SchedulerSettings(**scheduler),
            clock=self.loop.time,
            host_memory=host_memory,
        )

    def __getitem__(self, name: str) -> ServedModel:
        return self.controller.models[name]

    async def call(self, name: str, seconds: float) -> float:
        """One request taking ``seconds``; returns how long it waited to start."""
        index = len(self.backend.durations)
        self.backend.durations.append(seconds)
        self.backend.arrivals.append(self.loop.time())
        self.backend.waits.append(math.inf)
        status, _, _ = await self[name].call(Kind.RUN_JSON, [str(index).encode()])
        assert status == 200
        return self.backend.waits[index]

    def send(self, name: str, seconds: float) -> asyncio.Task[float]:
        return self.loop.create_task(self.call(name, seconds))

    def count(self, metric: str, **labels: str) -> float:
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == metric and wanted:
                    total += sample.value
        return total


def run(test: Callable[[], Awaitable[None]]) -> None:
    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(test())
    finally:
        loop.close()


def test_a_model_starts_on_demand_and_scales_to_zero_after_idle_timeout() -> None:
    async def scenario() -> None:
        node = Node(spec("a", idle_timeout=10))
        await node.controller.start()
        assert node["a"].replicas == [] and node["a"].state is ModelState.READY
        wait = await node.call("a", 1.0)
        assert wait == pytest.approx(0.5)  # the start
        await asyncio.sleep(5)
        assert node["a"].ready_replicas == 1  # within idle_timeout
        await asyncio.sleep(7)  # past it, and a tick later
        assert node["a"].replicas == []
        assert node.count("omni_model_evictions_total", reason="idle") == 1
        await node.controller.stop()

    run(scenario)


def test_a_burst_from_zero_starts_replicas_for_what_waits_at_once() -> None:
    async def scenario() -> None:
        node = Node(spec("a", max_replicas=4, target_ongoing_requests=2))
        await node.controller.start()
        burst = [node.send("a", 10.0) for _ in range(8)]
        await asyncio.sleep(0.1)
        # 8 waiting, 2 per replica: 4 replicas (max_replicas) start at once, not one per tick.
        assert len(node["a"].replicas) == 4
        waits = await asyncio.gather(*burst)
        # A sync engine takes one request at a time: 4 start at 0.5 s, 4 after them.
        assert sorted(waits) == pytest.approx([0.5] * 4 + [10.5] * 4)
        await node.controller.stop()

    run(scenario)


def test_panic_scales_up_a_running_model_within_seconds() -> None:
    async def scenario() -> None:
        node = Node(spec("a", max_replicas=4, target_ongoing_requests=1))
        await node.controller.start()
        await node.call("a", 0.1)
        assert len(node["a"].replicas) == 1
        burst = [node.send("a", 20.0) for _ in range(4)]
        await asyncio.sleep(1.6)  # a tick or two: the panic window sees 4 ongoing on 1 replica
        assert len(node["a"].replicas) > 1
        await asyncio.sleep(3)
        assert len(node["a"].replicas) == 4  # what the panic window asks for
        waits = await asyncio.gather(*burst)
        assert max(waits) < 5.0  # nobody waited for a 20 s request to finish
        await node.controller.stop()

    run(scenario)


def test_eviction_takes_the_cheapest_idle_model_and_never_a_busy_one() -> None:
    async def scenario() -> None:
        # Room for two 400 MB replicas. 'popular' is used often, 'rare' once, 'busy' is
        # running a long request when 'new' arrives.
        node = Node(
            spec("popular", 400 * MB), spec("rare", 400 * MB), spec("busy", 400 * MB),
            spec("new", 400 * MB), host_memory=1000 * MB,
        )  # fmt: skip
        await node.controller.start()
        for _ in range(5):
            await node.call("popular", 0.1)
        await node.call("rare", 0.1)
        await asyncio.sleep(2)
        busy = node.send("busy", 30.0)  # evicts one of the two idle ones: 'rare', the cheapest
        await asyncio.sleep(2)
        assert [m for m in ("popular", "rare", "busy") if node[m].replicas] == ["popular", "busy"]
        new = node.send("new", 1.0)  # 'busy' has a request in flight: 'popular' must go
        await asyncio.sleep(2)
        assert node["busy"].replicas and not node["popular"].replicas and node["new"].replicas
        await asyncio.gather(busy, new)
        assert node.count("omni_model_evictions_total", reason="memory") == 2
        await node.controller.stop()

    run(scenario)


def test_a_model_whose_replica_is_busy_waits_for_memory_instead_of_evicting_it() -> None:
    async def scenario() -> None:
        node = Node(spec("busy", 600 * MB), spec("new", 600 * MB), host_memory=1000 * MB)
        await node.controller.start()
        busy = node.send("busy", 10.0)
        await asyncio.sleep(1)
        new = node.send("new", 1.0)
        await asyncio.sleep(3)
        assert node["new"].blocked and node["busy"].ready_replicas == 1
        wait = await new
        assert wait > 9.0  # it started once 'busy' finished and could be evicted
        await busy
        await node.controller.stop()

    run(scenario)


def test_a_cancelled_request_keeps_its_slot_until_the_worker_answers() -> None:
    async def scenario() -> None:
        node = Node(spec("a"))
        await node.controller.start()
        await node.call("a", 0.1)  # warm
        first = node.send("a", 5.0)
        await asyncio.sleep(1)
        first.cancel()  # the client went away; the worker still runs it
        await asyncio.sleep(0)
        model = node["a"]
        assert model.in_flight == 1 and model.replicas[0].in_flight == 1
        second = node.send("a", 1.0)
        await asyncio.sleep(0.5)
        assert len(model.queue) == 1  # not handed to a replica that is still busy
        assert await second == pytest.approx(4.0)  # sent at 1.6 s, started when the first ended
        assert model.in_flight == 0
        await node.controller.stop()

    run(scenario)


def test_drain_lets_requests_in_flight_finish_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        node = Node(spec("a"))
        await node.controller.start()
        running = node.send("a", 3.0)
        await asyncio.sleep(1)
        drain = asyncio.ensure_future(node.controller.drain())
        await asyncio.sleep(0)
        with pytest.raises(ModelUnavailable, match="the runtime is stopping"):
            await node.call("a", 1.0)
        assert await running == pytest.approx(0.5)
        await drain
        assert not node.controller.ready
        await node.controller.stop()

    run(scenario)


class FailingWorkers(SimulatedWorkers):
    """Workers whose start fails while ``failing`` is set."""

    failing = True

    def worker(self, spec: ModelSpec) -> SimulatedWorker:
        backend = self

        class Failing(SimulatedWorker):
            async def start(self) -> None:
                if backend.failing:
                    raise LoadFailed(f"model '{spec.name}': too many open files")
                await super().start()

        return Failing(self, spec, 1)


def test_a_failed_start_is_retried_with_backoff_and_the_node_stays_ready() -> None:
    async def scenario() -> None:
        node = Node(spec("a"), backend=FailingWorkers)
        await node.controller.start()
        assert node.controller.ready
        with pytest.raises(ModelUnavailable) as failed:
            await node.call("a", 1.0)
        assert "too many open files" in str(failed.value)
        model = node["a"]
        assert model.state is ModelState.UNAVAILABLE and "trying again in" in model.reason
        with pytest.raises(ModelUnavailable) as again:  # within the backoff: at once
            await node.call("a", 1.0)
        assert again.value.retry_after >= 1
        assert node.controller.ready  # the node is fine: one model failed
        node.backend.failing = False  # type: ignore[attr-defined]
        await asyncio.sleep(1)  # past the backoff
        assert model.state is ModelState.UNAVAILABLE  # until a start succeeds
        assert "tries again on the next request" in model.reason
        assert await node.call("a", 1.0) == pytest.approx(0.5)
        assert model.failure == "" and model.ready_replicas == 1
        assert model.state is ModelState.READY
        await node.controller.stop()

    run(scenario)


def test_placement_follows_what_a_replica_holds_now() -> None:
    async def scenario() -> None:
        node = Node(spec("a", 800 * MB), host_memory=1000 * MB)
        await node.controller.start()
        await node.call("a", 0.1)
        replica = node["a"].replicas[0]
        worker = replica.worker
        assert isinstance(worker, SimulatedWorker)
        worker.host_bytes = 300 * MB  # it freed what it loaded with
        await asyncio.sleep(1.5)  # a measurement
        assert replica.host_bytes == 300 * MB and node["a"].expected_host == 300 * MB
        await node.controller.stop()

    run(scenario)
