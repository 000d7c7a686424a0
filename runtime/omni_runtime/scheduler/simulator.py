"""``omni-runtime simulate``: replay a request trace through the runtime's own scheduler.

Nothing of the scheduler is written here: the trace's requests go through the same
``Controller``, per-model queues (``ServedModel``) and policy as ``serve`` uses, on a virtual
clock (``VirtualTimeLoop``), with simulated workers (``SimulatedWorkers``) whose fixed physics
stand in for processes and GPUs. This module holds only the trace, the options, the models the
trace names (with the deployment's omni.toml applied, as ``serve`` applies it) and the search
for the fewest GPUs.

Policies: ``omni`` (the scheduler's own), ``lru`` (one replica per model, on demand, the least
recently used idle one stopped when memory is short) and ``static`` (placed once, never moved;
the baseline puts each model alone on a GPU of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_runtime.config import (
    ConfigError,
    ModelOverride,
    NodeConfig,
    OmniFile,
    load_omni_file,
    node_config,
)
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
from omni_sdk.units import format_size, parse_duration, parse_size
from omni_sdk.wire import Kind

__all__ = [
    "POLICIES",
    "SimulationOptions",
    "SimulationResult",
    "TraceError",
    "TraceRequest",
    "plan",
    "read_trace",
    "simulate",
]

POLICIES = ("omni", "lru", "static")
_MOST_GPUS = 1024  # the search gives up beyond this many GPUs
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


# -- the trace ---------------------------------------------------------------------------

_COLUMNS = ("time", "model", "duration", "memory")


def read_trace(path: Path) -> list[TraceRequest]:
    """Parse a trace CSV; a bad row raises ``TraceError`` naming the file, line and column."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a spreadsheet's BOM is fine
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    requests = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise TraceError(f"{path}: empty; expected a header: {','.join(_COLUMNS)}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:1: not CSV: {exc}") from None
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise TraceError(
                f"{path}:1: the header lacks column {', '.join(missing)} "
                f"(expected {','.join(_COLUMNS)}; got {','.join(header)})"
            )
        index = {c: header.index(c) for c in _COLUMNS}
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                requests.append(_parse_row(path, reader.line_num, row, index))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:{reader.line_num}: not CSV: {exc}") from None
    requests.sort(key=lambda r: r.time)
    return requests


def _parse_row(path: Path, line: int, row: list[str], index: dict[str, int]) -> TraceRequest:
    def cell(column: str) -> str:
        position = index[column]
        if position >= len(row):
            raise TraceError(f"{path}:{line}: column '{column}' is missing")
        return row[position].strip()

    def number(column: str, minimum: float, strict: bool) -> float:
        text = cell(column)
        try:
            value = float(text)
        except ValueError:
            raise TraceError(
                f"{path}:{line}: column '{column}': expected seconds, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
            raise TraceError(f"{path}:{line}: column '{column}': must be {bound}, got {text!r}")
        return value

    time = number("time", 0.0, strict=False)
    model = cell("model")
    if not model:
        raise TraceError(f"{path}:{line}: column 'model' is empty")
    duration = number("duration", 0.0, strict=True)
    text = cell("memory")
    try:
        memory = parse_size(text)
    except ValueError as exc:
        raise TraceError(f"{path}:{line}: column 'memory': {exc}") from None
    if memory <= 0:
        raise TraceError(f"{path}:{line}: column 'memory': must be above 0, got {text!r}")
    return TraceRequest(time=time, model=model, duration=duration, memory=memory)


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


def plan(
    trace: list[TraceRequest],
    options: SimulationOptions,
    progress: Callable[[str], None] | None = None,
    baseline: bool = True,
) -> dict[str, Any]:
    """The fewest GPUs that meet the target under the policy (or the given count, 0 for a CPU
    node), and the baseline: every model with a replica (a GPU) of its own, always (skipped,
    its keys None, with ``baseline=False``)."""
    options.check()
    models = model_sizes(trace, options)
    say = progress or (lambda _: None)

    def run(gpus: int, policy: str | None = None) -> SimulationResult:
        result = simulate(trace, options, gpus, policy)
        where = f"{gpus} GPUs" if gpus else "a CPU node"
        say(
            f"{result.policy} on {where}: {result.slo_attainment:.2%} within the SLO, "
            f"{result.cold_starts} cold starts"
        )
        return result

    baseline_gpus = 0 if options.gpus == 0 else max(1, len(models))
    dedicated = run(baseline_gpus, "dedicated") if baseline else None
    if options.gpus is not None:
        chosen = run(options.gpus)
        searched = False
    else:
        chosen = _fewest_gpus(options, max(1, len(models)), run)
        searched = True
    return {
        "requests": len(trace),
        "models": len(models),
        "policy": options.policy,
        "gpus": chosen.gpus,
        "searched": searched,
        "slo_attainment": round(chosen.slo_attainment, 6),
        "target": options.target,
        "meets_target": chosen.slo_attainment >= options.target,
        "baseline_gpus": dedicated.gpus if dedicated else None,
        "baseline_slo_attainment": round(dedicated.slo_attainment, 6) if dedicated else None,
        "gpu_saving": round(1 - chosen.gpus / dedicated.gpus, 6)
        if dedicated and dedicated.gpus
        else 0.0,
        "cold_starts": chosen.cold_starts,
        "cold_starts_per_1000": round(1000 * chosen.cold_starts / max(1, len(trace)), 3),
        "evictions": chosen.evictions,
        "wakes": chosen.wakes,
        "refused": chosen.refused,
        "p99_wait_seconds": _finite(chosen.p99_wait),
        "host_memory": chosen.host_memory,
        "idle_memory_gib": round(chosen.idle_bytes / (1 << 30), 3),
        "options": {
            "gpu_memory": options.gpu_memory,
            "max_batch": options.max_batch,
            "pcie_gbps": options.pcie_gbps,
            "disk_gbps": options.disk_gbps,
            "slo": options.slo,
            "start_seconds": options.start_seconds,
            "concurrency": options.concurrency,
            "config": str(options.config_path) if options.config_path else None,
        },
    }


def _fewest_gpus(
    options: SimulationOptions, most: int, run: Callable[[int], SimulationResult]
) -> SimulationResult:
    """The fewest GPUs that meet ``options.target``: doubling from 1 until a count meets it,
    then bisecting below it (a few short replays rather than one per model). Past ``most``
    (one GPU per model), doubling stops where it no longer helps."""
    results: dict[int, SimulationResult] = {}

    def once(gpus: int) -> SimulationResult:
        if gpus not in results:
            results[gpus] = run(gpus)
        return results[gpus]

    low, high = 1, 1
    while once(high).slo_attainment < options.target:
        more = min(_MOST_GPUS, high * 2)  # busy models may need several GPUs each
        if high >= _MOST_GPUS or (
            high >= most and once(more).slo_attainment <= results[high].slo_attainment
        ):
            return results[high]  # more GPUs do not help: the target cannot be met
        low, high = high + 1, more
    while low < high:
        middle = (low + high) // 2
        if once(middle).slo_attainment >= options.target:
            high = middle
        else:
            low = middle + 1
    return once(low)


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def parse_options(
    gpu_memory: str = "80GiB",
    max_batch: int = 16,
    pcie_gbps: float = 25.0,
    disk_gbps: float = 2.0,
    slo: str = "2s",
    target: float = 0.99,
    gpus: int | None = None,
    policy: str = "omni",
    host_memory: str | None = None,
    start_seconds: str = "0.2s",
    concurrency: int = 1,
    config: Path | None = None,
) -> SimulationOptions:
    """Options from the command line's strings; a bad one raises ``TraceError`` naming it."""

    def size(option: str, text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise TraceError(f"{option}: {exc}") from None

    def duration(option: str, text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise TraceError(f"{option}: {exc}") from None

    omni_file = None
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"{config}: no such file (--config)")
        omni_file = load_omni_file(config)
    options = SimulationOptions(
        gpu_memory=size("--gpu-memory", gpu_memory),
        max_batch=max_batch,
        pcie_gbps=pcie_gbps,
        disk_gbps=disk_gbps,
        slo=duration("--slo", slo),
        target=target,
        gpus=gpus,
        policy=policy,
        host_memory=size("--host-memory", host_memory) if host_memory is not None else None,
        start_seconds=duration("--start-seconds", start_seconds),
        concurrency=concurrency,
        config=omni_file,
        config_path=config,
    )
    options.check()
    return options
