"""Checks run before serving: scaling settings that contradict each other, models too big to run.

Each failure is a ``ConfigError`` naming the file (or the engine) that set each field, so
``serve`` stops with exit status 2 before any worker starts.
"""

from __future__ import annotations

import shutil
import subprocess

from omni_runtime.config import ConfigError, SchedulerSettings
from omni_runtime.discovery import ModelSpec
from omni_sdk.units import format_size

__all__ = ["check_models", "detect_gpus"]


def check_models(
    specs: list[ModelSpec],
    scheduler: SchedulerSettings,
    host_memory: int,
    scheduler_sources: dict[str, str],
    gpus: dict[str, int] | None = None,
) -> None:
    """Raise ``ConfigError`` for the first model whose settings cannot work on this node.

    ``scheduler_sources`` maps each ``[scheduler]`` field to the file that set it.
    """
    budget_source = (
        f"scheduler.host_memory in {scheduler_sources.get('host_memory', 'omni.toml')}"
        if scheduler.host_memory
        else "this node's memory less 1 GiB (scheduler.host_memory)"
    )
    for spec in specs:
        s = spec.scaling
        if s.min_replicas > s.max_replicas:
            raise ConfigError(
                f"model '{spec.name}': scaling.min_replicas ({s.min_replicas}, from "
                f"{spec.source_of('scaling.min_replicas')}) is greater than "
                f"scaling.max_replicas ({s.max_replicas}, from "
                f"{spec.source_of('scaling.max_replicas')}); lower one or raise the other"
            )
        if s.max_ongoing_requests and s.max_ongoing_requests < s.target_ongoing_requests:
            raise ConfigError(
                f"model '{spec.name}': scaling.max_ongoing_requests ({s.max_ongoing_requests}, "
                f"from {spec.source_of('scaling.max_ongoing_requests')}) is below "
                f"scaling.target_ongoing_requests ({s.target_ongoing_requests}, from "
                f"{spec.source_of('scaling.target_ongoing_requests')}), so no replica could "
                "ever reach its target"
            )
        memory = spec.resources.memory
        if memory > host_memory:
            raise ConfigError(
                f"model '{spec.name}': resources.memory ({format_size(memory)}, from "
                f"{spec.source_of('resources.memory')}) is larger than the node's budget "
                f"for all replicas, {format_size(host_memory)} ({budget_source}); "
                "lower the one or raise the other"
            )
        if s.min_replicas * memory > host_memory:
            raise ConfigError(
                f"model '{spec.name}': scaling.min_replicas ({s.min_replicas}, from "
                f"{spec.source_of('scaling.min_replicas')}) replicas of "
                f"resources.memory ({format_size(memory)}, from "
                f"{spec.source_of('resources.memory')}) do not fit in "
                f"{format_size(host_memory)} ({budget_source})"
            )
        if gpus and spec.device.startswith("cuda") and spec.resources.gpu_memory:
            key = "cuda:0" if spec.device == "cuda" else spec.device
            card = gpus.get(key)
            if card is None:
                raise ConfigError(
                    f"model '{spec.name}': device '{spec.device}' is not a GPU of this node "
                    f"(it has {', '.join(sorted(gpus))})"
                )
            budget = int(card * scheduler.gpu_overcommit)
            if spec.resources.gpu_memory > budget:
                raise ConfigError(
                    f"model '{spec.name}': resources.gpu_memory "
                    f"({format_size(spec.resources.gpu_memory)}, from "
                    f"{spec.source_of('resources.gpu_memory')}) is larger than {key}'s budget, "
                    f"{format_size(budget)} (its {format_size(card)} × "
                    f"scheduler.gpu_overcommit {scheduler.gpu_overcommit:g})"
                )
    kept = [s for s in specs if s.scaling.min_replicas]
    always = sum(s.scaling.min_replicas * s.resources.memory for s in kept)
    if len(kept) > 1 and always > host_memory:
        listed = ", ".join(
            f"'{s.name}' {s.scaling.min_replicas} × {format_size(s.resources.memory)}" for s in kept
        )
        raise ConfigError(
            f"the replicas that scaling.min_replicas keeps running ({listed}) need "
            f"{format_size(always)} together, more than {format_size(host_memory)} "
            f"({budget_source}); lower min_replicas or resources.memory in omni.toml"
        )


def detect_gpus() -> dict[str, int]:
    """Each NVIDIA GPU's memory in bytes, by device name ("cuda:0"); empty where none is seen."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    gpus = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        try:
            gpus[f"cuda:{int(index)}"] = int(float(mib)) << 20
        except ValueError:
            continue
    return gpus
