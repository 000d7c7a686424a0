"""One replay of a request trace through the runtime's own scheduler, on a virtual clock.

The trace's requests go through the same ``Controller``, per-model queues (``ServedModel``) and
policy as ``serve`` uses, on a virtual clock (``VirtualTimeLoop``), with simulated workers
(``SimulatedWorkers``) whose fixed physics stand in for processes and GPUs. This module holds
the options of a replay, its result, and the models the trace names (with the deployment's
omni.toml applied, as ``serve`` applies it); ``simulator`` reads the trace and searches for the
fewest GPUs.

Policies: ``omni`` (the scheduler's own), ``lru`` (one replica per model, on demand, the least
recently used idle one stopped when memory is short) and ``static`` (placed once, never moved;
the baseline puts each model alone on a GPU of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.config import ConfigError, ModelOverride, NodeConfig, OmniFile, node_config
from omni_runtime.discovery import ModelSpec
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler.baselines import LruPolicy, StaticPolicy
from omni_runtime.scheduler.checks import check_models
from omni_runtime.scheduler.controller import Controller, host_budget
from omni_runtime.scheduler.policy import Policy, SchedulerPolicy
from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable
from omni_runtime.scheduler.simulated import Physics, SimulatedWorkers
from omni_runtime.scheduler.virtual_time import VirtualTimeLoop
from omni_sdk import Resources, Scaling
from omni_sdk.units import format_size
from omni_sdk.wire import Kind

__all__ = [
    "POLICIES",
    "SimulationOptions",
    "SimulationResult",
    "TraceError",
    "TraceRequest",
    "model_sizes",
    "model_specs",
    "simulate",
]

POLICIES = ("omni", "lru", "static")
_UNLIMITED = 1 << 62


class TraceError(Exception):
    """A trace or an option is wrong; the message names the file, line and column, or option."""


@dataclass(frozen=True)
class TraceRequest:
    time: float
    model: str
    duration: float
    memory: int


@dataclass(frozen=True)
class SimulationOptions:
    gpu_memory: int = 80 << 30
    max_batch: int = 16
    pcie_gbps: float = 25.0
    disk_gbps: float = 2.0
    slo: float = 2.0
    target: float = 0.99
    gpus: int | None = None  # None: search; 0: a CPU node
    policy: str = "omni"
    host_memory: int | None = None  # --host-memory; else the config's, else serve's default
    start_seconds: float = 0.2  # a start on a CPU node
    concurrency: int = 1  # requests a CPU replica serves at once
    config: OmniFile | None = None  # --config: the deployment's omni.toml
    config_path: Path | None = None

    def check(self) -> None:
        """Raise ``TraceError`` naming the first option out of range."""
        problems = [
            ("--gpu-memory", self.gpu_memory > 0, "a size above 0, e.g. 80GiB"),
            ("--max-batch", self.max_batch >= 1, "at least 1"),
            ("--pcie-gbps", self.pcie_gbps > 0, "above 0"),
            ("--disk-gbps", self.disk_gbps > 0, "above 0"),
            ("--slo", self.slo > 0, "a duration above 0, e.g. 2s"),
            ("--target", 0 < self.target <= 1, "a fraction in (0, 1], e.g. 0.99"),
            ("--gpus", self.gpus is None or self.gpus >= 0, "0 (a CPU node) or more"),
            ("--policy", self.policy in POLICIES, "one of " + ", ".join(POLICIES)),
            ("--host-memory", self.host_memory is None or self.host_memory > 0, "above 0"),
            ("--start-seconds", self.start_seconds >= 0, "0 or more"),
            ("--concurrency", self.concurrency >= 1, "at least 1"),
        ]
        for option, ok, allowed in problems:
            if not ok:
                value = getattr(self, option[2:].replace("-", "_"))
                raise TraceError(f"{option} must be {allowed}; got {value!r}")

    @property
    def physics(self) -> Physics:
        return Physics(
            gpu_memory=self.gpu_memory,
            max_batch=self.max_batch,
            pcie_gbps=self.pcie_gbps,
            disk_gbps=self.disk_gbps,
            start_seconds=self.start_seconds,
            concurrency=self.concurrency,
        )

    def node(self) -> NodeConfig:
        """``[server]`` and ``[scheduler]`` exactly as ``serve`` would read them."""
        if self.config is None:
            return NodeConfig()
        return node_config({self.config_path or Path("omni.toml"): self.config})


@dataclass
class SimulationResult:
    gpus: int
    policy: str
    waits: list[float]  # per request, seconds from arrival to start; inf if it never started
    slo: float
    cold_starts: int = 0
    evictions: int = 0
    wakes: int = 0
    refused: int = 0  # answered 429 or 503 instead of served
    host_memory: int = 0
    idle_bytes: float = 0.0  # mean memory held by replicas with nothing in flight

    @property
    def requests(self) -> int:
        return len(self.waits)

    @property
    def slo_attainment(self) -> float:
        if not self.waits:
            return 1.0
        return sum(1 for w in self.waits if w <= self.slo + 1e-9) / len(self.waits)

    @property
    def p99_wait(self) -> float:
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# -- the trace's models ------------------------------------------------------------------


def model_sizes(trace: list[TraceRequest], options: SimulationOptions) -> dict[str, int]:
    """Each model's footprint (its largest ``memory``); one too big for a GPU is an error."""
    sizes: dict[str, int] = {}
    for request in trace:
        sizes[request.model] = max(sizes.get(request.model, 0), request.memory)
    if options.gpus == 0:
        return sizes
    for name, size in sizes.items():
        if size > options.gpu_memory:
            raise TraceError(
                f"model '{name}' needs {format_size(size)}, more than --gpu-memory "
                f"{format_size(options.gpu_memory)}: it could never be resident"
            )
    return sizes


def model_specs(trace: list[TraceRequest], options: SimulationOptions) -> list[ModelSpec]:
    """The trace's models as ``serve`` would configure them: the runtime's defaults, then the
    ``[models."NAME"]`` tables of ``--config`` (an unknown name is an error naming the file)."""
    sizes = model_sizes(trace, options)
    overrides = dict(options.config.models) if options.config is not None else {}
    source = str(options.config_path or "the --config file")
    for name in overrides:
        if name not in sizes:
            known = ", ".join(sorted(sizes)[:5]) + (", ..." if len(sizes) > 5 else "")
            raise ConfigError(
                f'{source}: [models."{name}"] names a model the trace does not have '
                f"(its models: {known})"
            )
    gpu = options.gpus != 0
    specs = []
    for name, size in sizes.items():
        # On a GPU node the trace's memory is the GPU footprint and a replica's host memory is
        # not modelled; on a CPU node it is the replica's host memory.
        resources = Resources(memory=0, gpu_memory=size) if gpu else Resources(memory=size)
        scaling = Scaling()
        override = overrides.get(name, ModelOverride())
        resources, scaling = override.apply(resources, scaling)
        sources = {
            f"{section}.{key}": source
            for section in ("resources", "scaling")
            if (value := getattr(override, section)) is not None
            for key in value.model_fields_set
        }
        specs.append(
            ModelSpec(
                name=name,
                task="",
                description="",
                package=name,
                package_dir=Path(source),
                python="",
                engine_class="simulated",
                inputs=[],
                outputs=[],
                input_schema={},
                output_schema={},
                resources=resources,
                scaling=scaling,
                # A GPU batches what it runs; a CPU replica serves --concurrency at once.
                max_batch_size=options.max_batch if gpu else options.concurrency,
                device="cuda" if gpu else "cpu",
                sources=sources,
            )
        )
    return specs


# -- the simulation ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_scheduler() -> Iterator[None]:
    """The controller logs each start and stop; a simulation makes thousands."""
    logger = logging.getLogger("omni.scheduler")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _policy(name: str, node: NodeConfig) -> Policy:
    if name == "lru":
        return LruPolicy()
    if name in ("static", "dedicated"):
        return StaticPolicy(dedicated=name == "dedicated")
    return SchedulerPolicy(node.scheduler.stable_window, node.scheduler.panic_window)


async def _replay(
    trace: list[TraceRequest], options: SimulationOptions, gpus: int, policy: str
) -> SimulationResult:
    loop = asyncio.get_running_loop()
    node = options.node()
    specs = model_specs(trace, options)
    devices = [f"cuda:{i}" for i in range(gpus)]
    host = options.host_memory or host_budget(node.scheduler)
    if policy == "dedicated":
        host = _UNLIMITED
    cards = dict.fromkeys(devices, options.gpu_memory)
    check_models(specs, node.scheduler, host, node.scheduler_sources, cards)
    backend = SimulatedWorkers(
        options.physics,
        [r.duration for r in trace],
        loop.time,
        devices,
        footprints=model_sizes(trace, options),
    )
    metrics = Metrics()
    controller = Controller(
        specs,
        node.server,
        metrics,
        backend,
        node.scheduler,
        cards,
        clock=loop.time,
        policy=_policy(policy, node),
        host_memory=host,
        pcie_gbps=options.pcie_gbps,
    )
    await controller.start()  # a static placement is loaded before the first request
    start = loop.time()
    refused = 0
    idle_samples: list[int] = []

    async def sample_idle_memory() -> None:
        """What idle replicas hold, once a second: the memory kept waiting for reuse."""
        while True:
            idle_samples.append(
                sum(
                    r.host_bytes + r.gpu_bytes
                    for m in controller.models.values()
                    for r in m.replicas
                    if not r.in_flight
                )
            )
            await asyncio.sleep(1.0)

    sampler = loop.create_task(sample_idle_memory())

    async def request(index: int) -> None:
        nonlocal refused
        backend.arrivals[index] = loop.time()
        model = controller.models[trace[index].model]
        try:
            await model.call(Kind.RUN_JSON, [str(index).encode()])
        except (ModelBusy, ModelUnavailable):
            refused += 1  # its wait stays infinite: it was never served

    tasks: list[asyncio.Task[None]] = []

    def arrive(index: int) -> None:
        tasks.append(loop.create_task(request(index)))

    for index, r in enumerate(trace):
        loop.call_at(start + r.time, arrive, index)
    last = trace[-1].time if trace else 0.0
    await asyncio.sleep(last)
    while tasks:
        batch, tasks[:] = list(tasks), []
        await asyncio.gather(*batch)
    sampler.cancel()
    await controller.stop()
    return SimulationResult(
        gpus=gpus,
        policy=policy,
        waits=backend.waits,
        slo=options.slo,
        cold_starts=_count(metrics, "omni_model_cold_starts_total"),
        evictions=_count(metrics, "omni_model_evictions_total", reason="memory"),
        wakes=_count(metrics, "omni_model_wakes_total"),
        refused=refused,
        host_memory=host,
        idle_bytes=sum(idle_samples) / max(1, len(idle_samples)),
    )


def _count(metrics: Metrics, name: str, **labels: str) -> int:
    """A counter summed over every model, read from the registry as ``/metrics`` shows it."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return int(total)


def simulate(
    trace: list[TraceRequest], options: SimulationOptions, gpus: int, policy: str | None = None
) -> SimulationResult:
    """Replay ``trace`` on ``gpus`` GPUs (0: a CPU node) under ``policy`` (default: the
    options'), through the runtime's controller on a virtual clock."""
    loop = VirtualTimeLoop()
    try:
        with _quiet_scheduler():
            return loop.run_until_complete(_replay(trace, options, gpus, policy or options.policy))
    finally:
        loop.close()
