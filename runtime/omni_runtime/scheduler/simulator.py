"""``omni-runtime simulate``: read a request trace, replay it, and find the fewest GPUs.

Nothing of the scheduler is written here: each replay (``replay.simulate``) sends the trace's
requests through the same ``Controller``, per-model queues and policy as ``serve`` uses, on a
virtual clock with simulated workers. This module holds only the trace's CSV, the command's
options and the search for the fewest GPUs that meet the target.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni_runtime.config import ConfigError, load_omni_file
from omni_runtime.scheduler.replay import (
    SimulationOptions,
    SimulationResult,
    TraceError,
    TraceRequest,
    model_sizes,
    simulate,
)
from omni_sdk.units import parse_duration, parse_size

__all__ = ["TraceError", "parse_options", "plan", "read_trace"]

_MOST_GPUS = 1024  # the search gives up beyond this many GPUs


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


# -- the plan, and the command's options -------------------------------------------------


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
