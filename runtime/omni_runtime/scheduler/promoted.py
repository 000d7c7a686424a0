"""The versions promoted by rollouts, kept in the state directory (``rollouts.json``) so that a
restart, even after SIGKILL, serves each model in its last promoted version and never in one
that was still being rolled out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from omni_runtime.discovery import Discovery, ModelSpec

__all__ = ["Discover", "promoted", "record_promoted", "with_promoted"]

log = logging.getLogger("omni.rollout")
Discover = Callable[[list[Path]], Awaitable[Discovery]]


def record_promoted(state_file: Path, name: str, record: dict[str, Any]) -> None:
    """Record model ``name``'s promoted version (``{"version", "package", "given",
    "versions"}``) in ``state_file``; a file that cannot be written is a warning."""
    saved = promoted(state_file)
    saved[name] = record
    try:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        staging = state_file.with_suffix(".tmp")
        staging.write_text(json.dumps(saved, indent=2))
        os.replace(staging, state_file)
    except OSError as exc:
        log.warning("model '%s': version %s is promoted but could not be recorded in %s (%s); "
                    "the next start serves the package it is given", name, record["version"],
                    state_file, exc)  # fmt: skip


def promoted(state_file: Path) -> dict[str, dict[str, Any]]:
    """The versions promoted by rollouts, by model: ``{"version", "package", "versions"}``.
    A file that cannot be read counts as none (a warning names it)."""
    try:
        value = json.loads(state_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("rollouts: %s cannot be read (%s); serving the packages given", state_file, exc)
        return {}
    if not isinstance(value, dict):
        return {}
    return {
        name: entry
        for name, entry in value.items()
        if isinstance(entry, dict) and isinstance(entry.get("package"), str)
    }


async def with_promoted(
    specs: list[ModelSpec], state_file: Path, discover: Discover
) -> list[ModelSpec]:
    """``specs``, each model a rollout promoted in its promoted version: a restart (even
    after SIGKILL) serves what was promoted, never a version half rolled out."""
    saved = promoted(state_file)
    result = []
    for spec in specs:
        entry = saved.get(spec.name)
        if (
            entry is None
            or entry.get("version") == spec.version
            or entry.get("given") != str(spec.package_dir)  # another deployment's model
        ):
            result.append(spec)
            continue
        discovery = await discover([Path(entry["package"])])
        found = next((s for s in discovery.models if s.name == spec.name), None)
        if found is None:
            why = discovery.failures[0].error if discovery.failures else "no such model there"
            log.warning("model '%s': its promoted version %s (package %s) cannot be served "
                        "(%s); serving version %s", spec.name, entry.get("version"),
                        entry["package"], why, spec.version)  # fmt: skip
            result.append(spec)
            continue
        log.info("model '%s': serving version %s, promoted by a rollout (package %s)",
                 spec.name, found.version, entry["package"])  # fmt: skip
        result.append(found)
    return result
