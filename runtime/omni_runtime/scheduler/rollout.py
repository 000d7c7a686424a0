"""Replacing a model by a new version of it without a failed request.

A rollout (``POST /v2/repository/models/{name}/rollout``, ``omni-runtime rollout``):

1. **loading**: the new package is discovered (a package that fails, registers no model of
   that name, or holds the version that already serves is refused before anything starts),
   and the new version starts beside the current one, under ``name@version``, with as many
   ready replicas as the current one has. It gets no traffic yet; a version that does not
   start never gets any (**failed**).
2. **canary**: ``canary_percent`` of the requests go to it (all of them without a canary)
   for the ``watch`` window. When its own answers of 500 and above pass ``error_rate`` of
   its requests (at least ``MIN_ERRORS`` of them), or its p99 latency passes the current
   one's by ``P99_FACTOR``, traffic goes back to the current version by itself
   (**rolled_back**, with the reason).
3. **promoted**: every request goes to the new version; the old one finishes what it holds
   (in flight and queued) and stops.

A model scaled to zero has nothing to drain: its package is switched at once. A rollout can
be aborted (DELETE) until it is promoted; a second one of the same model is refused (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler.controller import Controller
from omni_runtime.scheduler.handle import ModelDirectory
from omni_runtime.scheduler.models import ServedModel
from omni_runtime.scheduler.promoted import Discover, promoted, record_promoted
from omni_sdk.units import parse_duration

__all__ = ["Rollout", "RolloutError", "Rollouts"]

log = logging.getLogger("omni.rollout")

ERROR_RATE = 0.05
MIN_ERRORS = 3
P99_FACTOR = 3.0
MIN_SAMPLES = 20  # latencies of each version before p99s are compared
CHECK_SECONDS = 0.1


class RolloutError(Exception):
    """A rollout refused before anything started: the HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Rollout:
    model: str
    from_version: str
    to_version: str
    package: str
    canary_percent: float
    watch: float
    auto_rollback: bool
    state: str = "loading"
    reason: str | None = None
    started: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def move(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason, self.updated = state, reason, time.time()
        self.history.append({"state": state, "at": self.updated, "reason": reason})
        log.info("model '%s': rollout %s -> %s: %s%s", self.model, self.from_version,
                 self.to_version, state, f" ({reason})" if reason else "")  # fmt: skip

    @property
    def finished(self) -> bool:
        return self.state in ("promoted", "rolled_back", "failed", "aborted")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Rollouts:
    def __init__(
        self,
        controller: Controller,
        directory: ModelDirectory,
        discover: Discover,
        error_rate: float = ERROR_RATE,
        state_file: Path | None = None,
        given: dict[str, Path] | None = None,
    ) -> None:
        self.controller = controller
        self.directory = directory
        self.discover = discover
        self.error_rate = error_rate
        self.rollouts: dict[str, Rollout] = {}  # the last one of each model
        self.state_file = state_file  # the promoted versions, for the next start
        # The package each model was served from when the runtime was started: a promoted
        # version is served again only by a runtime given that same package.
        self.given = given or {}
        saved = promoted(state_file) if state_file is not None else {}
        # Each model's versions seen, for `to`.
        self.packages: dict[str, dict[str, Path]] = {
            name: {v: Path(p) for v, p in entry.get("versions", {}).items()}
            for name, entry in saved.items()
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- the API -------------------------------------------------------------------------

    async def start(self, name: str, request: dict[str, Any]) -> Rollout:
        """Check the request and the package, then start the rollout in the background."""
        current = self.controller.models.get(name)
        if current is None:
            raise RolloutError(404, f"Request for unknown model: '{name}' is not found")
        running = self.rollouts.get(name)
        if running is not None and not running.finished:
            raise RolloutError(
                409,
                f"model '{name}': a rollout to version {running.to_version} is {running.state}; "
                "wait for it, or abort it (DELETE)",
            )
        known = self.packages.setdefault(name, {})
        known.setdefault(current.spec.version, current.spec.package_dir)
        if isinstance(request, dict) and "to" in request:  # back to a version seen before
            to = request.pop("to")
            if str(to) not in known:
                seen = ", ".join(sorted(known)) or "none"
                raise RolloutError(404, f"model '{name}': no package known for version {to!r} "
                                   f"(known: {seen})")  # fmt: skip
            request = {**request, "package": str(known[str(to)])}
        package, canary, watch, auto = _options(name, request)
        discovery = await self.discover([package])
        if discovery.failures:
            raise RolloutError(400, f"model '{name}': {discovery.failures[0].error}")
        spec = next((s for s in discovery.models if s.name == name), None)
        if spec is None:
            found = ", ".join(s.name for s in discovery.models) or "none"
            raise RolloutError(
                400, f"model '{name}': package {package} registers no such model (it has {found})"
            )
        if spec.version == current.spec.version:
            raise RolloutError(409, f"model '{name}': version {spec.version} is already current")
        if any(m.spec.name == name and m is not current for m in self.controller.models.values()):
            raise RolloutError(409, f"model '{name}': an earlier version is still draining")
        rollout = Rollout(
            name, current.spec.version, spec.version, str(package), canary, watch, auto
        )
        rollout.move("loading")
        known[spec.version] = package
        self.rollouts[name] = rollout
        self._tasks[name] = asyncio.create_task(self._run(rollout, spec))
        return rollout

    async def replace(self, name: str, spec: ModelSpec, package: str) -> Rollout | None:
        """Roll model ``name`` out to ``spec`` at once, no canary (its entry in the fleet's
        catalog changed); a rollout in progress is aborted first. None, with nothing changed,
        where that cannot be done: ``name`` is not served, ``spec`` is the current version, or
        an earlier version is still draining."""
        current = self.controller.models.get(name)
        if current is None or spec.version == current.spec.version:
            return None
        running = self.rollouts.get(name)
        if running is not None and not running.finished:
            await self.abort(name)
        if any(m.spec.name == name and m is not current for m in self.controller.models.values()):
            return None
        rollout = Rollout(name, current.spec.version, spec.version, package, 0.0, 0.0, True)
        rollout.move("loading")
        known = self.packages.setdefault(name, {})
        known.setdefault(current.spec.version, current.spec.package_dir)
        known[spec.version] = spec.package_dir
        self.rollouts[name] = rollout
        self._tasks[name] = asyncio.create_task(self._run(rollout, spec))
        return rollout

    async def abort(self, name: str) -> Rollout:
        rollout = self.rollouts.get(name)
        if rollout is None or rollout.finished:
            raise RolloutError(409, f"model '{name}' has no rollout in progress")
        task = self._tasks.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return rollout

    async def stop(self) -> None:
        for name, rollout in list(self.rollouts.items()):
            if not rollout.finished:
                await self.abort(name)

    # -- the rollout ---------------------------------------------------------------------

    async def _run(self, rollout: Rollout, spec: ModelSpec) -> None:
        name = rollout.model
        key = f"{name}@{spec.version}"
        old = self.controller.models[name]
        new: ServedModel | None = None
        try:
            ready = old.ready_replicas
            floor = max(spec.scaling.min_replicas, ready)
            boot = spec.scaling.model_copy(update={"min_replicas": floor})
            new = self.controller.add(dataclasses.replace(spec, scaling=boot), key)
            if ready:
                problem = await self._start(new, ready)
                if problem:
                    rollout.move("failed", problem)
                    await self.controller.remove(key, "its rollout failed")
                    return
                self.directory.split(name, key, rollout.canary_percent or 100.0)
                if rollout.watch:
                    rollout.move("canary")
                    problem = await self._watch(rollout, old, new)
                    if problem:
                        self.directory.unsplit(name)
                        new.successor = old  # a request that already chose it goes back too
                        rollout.move("rolled_back", problem)
                        await self.controller.remove(key, f"rolled back: {problem}")
                        return
            await self._promote(rollout, old, new, spec)
        except asyncio.CancelledError:
            if rollout.state != "promoted":
                self.directory.unsplit(name)
                if new is not None:
                    new.successor = old
                if new is not None and self.controller.models.get(key) is new:
                    await asyncio.shield(self.controller.remove(key, "its rollout was aborted"))
                rollout.move("aborted", "aborted by an operator")
            raise
        except Exception as exc:  # a bug must not leave traffic split
            log.exception("model '%s': the rollout failed", name)
            self.directory.unsplit(name)
            if new is not None and self.controller.models.get(key) is new:
                await self.controller.remove(key, "its rollout failed")
            rollout.move("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.controller.metrics.rollouts.labels(name, rollout.state).inc()

    async def _start(self, new: ServedModel, replicas: int) -> str:
        """Start ``replicas`` replicas of the new version; why not, or ""."""
        error = await self.controller.load(new)
        if error:
            return f"version {new.spec.version} did not start: {error}"
        deadline = time.monotonic() + self.controller.settings.load_timeout
        while new.ready_replicas < replicas:
            if new.failure:
                return f"version {new.spec.version} did not start: {new.failure}"
            if time.monotonic() > deadline:
                return f"version {new.spec.version} had {new.ready_replicas} of {replicas} replicas"
            new.touch()
            await asyncio.sleep(CHECK_SECONDS)
        return ""

    async def _watch(self, rollout: Rollout, old: ServedModel, new: ServedModel) -> str:
        """Watch the new version for ``rollout.watch`` seconds; why to roll back, or ""."""
        base_errors, base_count = new.stats.server_errors, _count(new)
        old_latencies = len(old.stats.latencies)
        deadline = time.monotonic() + rollout.watch
        while time.monotonic() < deadline:
            await asyncio.sleep(CHECK_SECONDS)
            if not rollout.auto_rollback:
                continue
            errors = new.stats.server_errors - base_errors
            count = _count(new) - base_count
            if errors >= MIN_ERRORS and errors > self.error_rate * count:
                version = new.spec.version
                return f"version {version} answered {errors} of {count} requests with an error"
            if new.failure:
                return f"version {new.spec.version} failed: {new.failure}"
            # The new version's first answers (a fresh worker's first calls) are left out.
            mine = list(new.stats.latencies)[-count:][MIN_SAMPLES:] if count else []
            theirs = list(old.stats.latencies)[old_latencies:]
            if len(mine) >= MIN_SAMPLES and len(theirs) >= MIN_SAMPLES:
                p99_new, p99_old = _p99(mine), _p99(theirs)
                if p99_new > P99_FACTOR * max(p99_old, 0.001):
                    return (
                        f"version {new.spec.version}'s p99 latency {p99_new * 1e3:.0f} ms is over "
                        f"{P99_FACTOR:g}x the current one's ({p99_old * 1e3:.0f} ms)"
                    )
        return ""

    async def _promote(
        self, rollout: Rollout, old: ServedModel, new: ServedModel, spec: ModelSpec
    ) -> None:
        name = rollout.model
        self.directory.split(name, new.name, 100.0)  # every new request to the new version
        retired = f"{name}@{old.spec.version}"
        self.controller.rekey(name, retired)
        self.controller.rekey(new.name, name)
        old.successor = new  # a request that already chose the old version goes to the new
        new.spec = spec  # its own scaling, now that it serves
        self.directory.unsplit(name)
        rollout.move("promoted")
        self._save(name, spec.version, rollout.package)
        # What the old version holds (in flight and queued) finishes on it; then it stops.
        deadline = time.monotonic() + self.controller.settings.drain_timeout
        while (old.in_flight or old.queue) and time.monotonic() < deadline:
            await asyncio.sleep(CHECK_SECONDS)
        await asyncio.shield(self.controller.remove(retired, f"replaced by version {spec.version}"))

    def _save(self, name: str, version: str, package: str) -> None:
        """Remember the promoted version, so that the next start serves it too."""
        if self.state_file is None:
            return
        record = {
            "version": version,
            "package": package,
            "given": str(self.given.get(name, "")),
            "versions": {v: str(p) for v, p in self.packages.get(name, {}).items()},
        }
        record_promoted(self.state_file, name, record)


def _options(name: str, request: dict[str, Any]) -> tuple[Path, float, float, bool]:
    if not isinstance(request, dict):
        raise RolloutError(400, f"model '{name}': the body must be a JSON object")
    unknown = set(request) - {"package", "canary_percent", "watch", "auto_rollback"}
    if unknown:
        raise RolloutError(400, f"model '{name}': unknown field(s) {sorted(unknown)}")
    package = request.get("package")
    if not isinstance(package, str) or not package:
        raise RolloutError(400, f"model '{name}': 'package' (a package directory) is required")
    path = Path(package)
    if not path.is_absolute() or not (path / "pyproject.toml").is_file():
        raise RolloutError(
            400, f"model '{name}': 'package' {package!r} is not a package directory (an "
            "absolute path with a pyproject.toml)"
        )  # fmt: skip
    canary = request.get("canary_percent", 0)
    if isinstance(canary, bool) or not isinstance(canary, int | float) or not 0 <= canary <= 100:
        raise RolloutError(400, f"model '{name}': 'canary_percent' must be a number 0-100")
    try:
        watch = parse_duration(request.get("watch", 0))
    except ValueError as exc:
        raise RolloutError(400, f"model '{name}': 'watch': {exc}") from None
    auto = request.get("auto_rollback", True)
    if not isinstance(auto, bool):
        raise RolloutError(400, f"model '{name}': 'auto_rollback' must be true or false")
    if canary and not watch:
        watch = 60.0  # a canary is watched; a minute unless the request says otherwise
    return path.resolve(), float(canary), watch, auto


def _count(model: ServedModel) -> int:
    return model.stats.success_count + model.stats.fail_count


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
