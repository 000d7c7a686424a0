"""Finding model packages and asking each one's interpreter what engines it registers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_runtime.config import (
    CONFIG_NAME,
    ConfigError,
    ModelOverride,
    OmniFile,
    load_omni_file,
)
from omni_runtime.isolation import CgroupError, Isolation, WorkerCgroup
from omni_runtime.isolation.environments import (
    EnvironmentBuilder,
    EnvironmentError_,
    PackageEnvironment,
)
from omni_runtime.isolation.plan import worker_environment
from omni_runtime.overrides import (
    override_for,
    own_overrides,
    sequence_for,
    shared_overrides,
    warn_shadowed,
)
from omni_runtime.progress import DiscoveryProgress, LoggedProgress
from omni_runtime.versions import model_version
from omni_sdk import Resources, Scaling
from omni_sdk.model_config import is_zero_code
from omni_sdk.sequences import SequenceControls
from omni_sdk.units import format_size

__all__ = ["DiscoveryError", "ModelSpec", "PackageFailure", "discover_all", "find_packages"]


DISCOVERY_TIMEOUT = 120.0  # seconds a package's import may take before it is given up
# What one package's discovery may use: its models' own limits are not known before it ends.
DISCOVERY_RESOURCES = Resources(memory=2 << 30, cpus=1.0)
_discovery_ids = iter(range(1, 1 << 62))
log = logging.getLogger("omni.discovery")


class DiscoveryError(Exception):
    """A PATH given to the CLI holds no model package; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable engine, as its package's interpreter described it."""

    name: str
    task: str
    description: str
    package: str
    package_dir: Path
    python: str
    engine_class: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    resources: Resources
    scaling: Scaling
    max_batch_size: int = 0
    batch_dimension: bool = False  # dimension 0 of every tensor is the batch (a TensorEngine's)
    version: str = "1"  # the package's distribution version, unless omni.toml sets one
    device: str = "cpu"
    is_async: bool = False
    streaming: bool = False  # infer yields chunks
    env: dict[str, str] = field(default_factory=dict)  # [models."X".env]
    network: str = "loopback"  # or "host"
    sequence: SequenceControls | None = None  # a stateful model's control inputs
    # input_schema says everything the worker's validation does (no custom validator), so a
    # body may be refused by the schema before the model starts.
    input_schema_exact: bool = False
    warmup: dict[str, Any] | None = None  # Engine.warmup: a request each new replica answers
    # Where each overridden setting came from ("scaling.min_replicas" -> the omni.toml's path),
    # so a contradiction can name the file.
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, setting: str) -> str:
        """The omni.toml that set ``setting`` (e.g. "scaling.min_replicas"), or the engine."""
        return (
            self.sources.get(setting) or f"engine {self.engine_class} (package {self.package_dir})"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "description": self.description,
            "package": self.package,
            "path": str(self.package_dir),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "resources": self.resources.model_dump(),
            "scaling": self.scaling.model_dump(),
            "max_batch_size": self.max_batch_size,
        }


@dataclass(frozen=True)
class PackageFailure:
    """A package whose engines could not be discovered, and why."""

    package_dir: Path
    error: str


@dataclass
class Discovery:
    models: list[ModelSpec] = field(default_factory=list)
    failures: list[PackageFailure] = field(default_factory=list)
    environments: dict[Path, PackageEnvironment] = field(default_factory=dict)


def find_packages(paths: list[Path]) -> list[Path]:
    """Each PATH is a package (has pyproject.toml) or a directory of packages."""
    packages: list[Path] = []
    for path in paths:
        path = path.resolve()
        if not path.exists():
            raise DiscoveryError(f"{path} does not exist")
        if (path / "pyproject.toml").is_file() or is_zero_code(path):
            packages.append(path)
            continue
        if not path.is_dir():
            raise DiscoveryError(f"{path} is neither a model package nor a directory of them")
        found = sorted(
            p for p in path.iterdir() if (p / "pyproject.toml").is_file() or is_zero_code(p)
        )
        if not found:
            raise DiscoveryError(
                f"{path} holds no model package: expected pyproject.toml (or an omni.toml with "
                "a [model] table: a zero-code package) in it or in its immediate subdirectories"
            )
        packages.extend(found)
    return list(dict.fromkeys(packages))


def config_files(paths: list[Path], explicit: Path | None = None) -> dict[Path, OmniFile]:
    """omni.toml files that apply: the explicit one, repository roots, then package dirs."""
    files: dict[Path, OmniFile] = {}
    candidates = [explicit] if explicit else []
    for path in paths:
        path = path.resolve()
        candidates.append(path / CONFIG_NAME)
        if not (path / "pyproject.toml").is_file() and path.is_dir():
            candidates.extend(p / CONFIG_NAME for p in sorted(path.iterdir()))
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and candidate not in files:
            files[candidate] = load_omni_file(candidate)
    if explicit is not None and explicit not in files:
        raise ConfigError(f"{explicit}: no such file")
    return files


async def _describe_package(
    package_dir: Path,
    python: str,
    isolation: Isolation | None,
    timeout: float,
    overrides: list[ModelOverride],
) -> dict[str, Any]:
    """Run ``omni_sdk.discover`` in the package's interpreter (in the sandbox where there is
    one: importing a package runs its code), with what ``overrides`` give: the node's network if
    one has ``network = "host"`` (a TritonEngine reads its remote's metadata), and their envs."""
    launcher: list[str] = []
    model_env: dict[str, str] = {}
    for override in overrides:
        model_env.update(override.env or {})
    env = worker_environment(os.environ, model_env, None)
    cgroup: WorkerCgroup | None = None
    if isolation is not None and isolation.cgroups is not None:
        try:
            cgroup = isolation.cgroups.create(
                f"discover-{next(_discovery_ids)}", DISCOVERY_RESOURCES
            )
        except (CgroupError, OSError) as exc:
            return {"error": f"package {package_dir}: no cgroup for its discovery: {exc}"}
    if isolation is not None:
        environment = Path(python).parent.parent if python != sys.executable else None
        launcher = isolation.launcher(
            model=f"discover:{package_dir}",
            package=package_dir,
            environment=environment,
            memory_limit=DISCOVERY_RESOURCES.memory if cgroup is not None else 0,
            network=any(o.network == "host" for o in overrides),
            cgroup=cgroup,
            cache=False,  # nothing it writes outlives it
        )
    try:
        process = await asyncio.create_subprocess_exec(
            *launcher,
            python,
            "-m",
            "omni_sdk.discover",
            str(package_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=package_dir,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            return {
                "error": f"package {package_dir}: discovery did not finish within {timeout:g}s "
                "(importing the package must not do long work; load weights in Engine.load)"
            }
        if cgroup is not None and process.returncode == -signal.SIGKILL and cgroup.oom_killed():
            limit = format_size(DISCOVERY_RESOURCES.memory)
            return {
                "error": f"package {package_dir}: its discovery exceeded its memory limit of "
                f"{limit} and was killed; importing the package must not load weights (do "
                "that in Engine.load)"
            }
    finally:
        if cgroup is not None:
            cgroup.kill()  # whatever it left running
            cgroup.remove()
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        result = {"error": f"package {package_dir}: discovery failed: " + " | ".join(tail)}
    return result


def _registered(result: dict[str, Any]) -> list[str]:
    """The model names a discovery result registers: its engines', or, when describing one
    failed, those it registered before (a TritonEngine without its remote's URL, say)."""
    if "engines" in result:
        return [str(engine["name"]) for engine in result["engines"]]
    names = result.get("names")
    return [str(n) for n in names] if isinstance(names, list) else []


def _check_unique(packages: list[Path], results: list[dict[str, Any]]) -> None:
    """Two packages that register one model name stop discovery, naming both."""
    seen: dict[str, Path] = {}
    for package_dir, result in zip(packages, results, strict=True):
        for name in _registered(result):
            if seen.get(name, package_dir) != package_dir:
                raise DiscoveryError(
                    f"model {name!r} is registered by both {seen[name]} and {package_dir}; "
                    "rename one of them or serve only one of the two packages"
                )
            seen[name] = package_dir


async def discover_all(
    packages: list[Path],
    files: dict[Path, OmniFile],
    builder: EnvironmentBuilder | None = None,
    isolation: Isolation | None = None,
    timeout: float = DISCOVERY_TIMEOUT,
    progress: DiscoveryProgress | None = None,
) -> Discovery:
    """Build each package's environment, then ask its interpreter what it registers.

    Without a builder every package uses the runtime's own interpreter. Failures are collected
    per package, never raised. ``progress`` hears of each package's discovery as it starts and
    ends (log lines by default).
    """
    shown = progress or LoggedProgress()

    async def describe(package_dir: Path, overrides: list[ModelOverride]) -> dict[str, Any]:
        shown.discovering(package_dir.name)
        started = time.monotonic()
        result = await _describe_package(
            package_dir, pythons[package_dir], isolation, timeout, overrides
        )
        models = [e["name"] for e in result.get("engines", [])]
        shown.discovered(
            package_dir.name, time.monotonic() - started, models, result.get("error", "")
        )
        return result

    discovery = Discovery()
    every_package = list(packages)
    pythons: dict[Path, str] = {}
    # A zero-code package runs in its kind's environment: the runtime's, where engines live.
    pythons = {p: sys.executable for p in packages if builder is None or is_zero_code(p)}
    if builder is not None:
        to_build = [p for p in packages if p not in pythons]
        environments = await asyncio.gather(
            *(builder.ensure(p) for p in to_build), return_exceptions=True
        )
        for package_dir, environment in zip(to_build, environments, strict=True):
            if isinstance(environment, EnvironmentError_):
                discovery.failures.append(PackageFailure(package_dir, str(environment)))
            elif isinstance(environment, BaseException):
                raise environment
            else:
                pythons[package_dir] = str(environment.python)
                discovery.environments[package_dir] = environment
    packages = [p for p in packages if p in pythons]
    # Each package's discovery sees the env and network of its own models alone. First with
    # what its own omni.toml says; then, only where the repository's omni.toml gives the
    # models it registered an env or the node's network, once more with those.
    results = await asyncio.gather(*(describe(p, own_overrides(p, files)) for p in packages))
    _check_unique(packages, results)
    again: dict[int, list[ModelOverride]] = {}
    for index, (package_dir, result) in enumerate(zip(packages, results, strict=True)):
        shared = shared_overrides(_registered(result), files, every_package)
        if any(o.env or o.network == "host" for o in shared):
            again[index] = [*own_overrides(package_dir, files), *shared]
    rerun = await asyncio.gather(*(describe(packages[i], o) for i, o in again.items()))
    for index, result in zip(again, rerun, strict=True):
        results[index] = result
    _check_unique(packages, results)
    for package_dir, result in zip(packages, results, strict=True):
        if "error" in result:
            discovery.failures.append(PackageFailure(package_dir, result["error"]))
            continue
        for engine in result["engines"]:
            name = engine["name"]
            resources = Resources.model_validate(engine["resources"])
            scaling = Scaling.model_validate(engine["scaling"])
            device = "cpu"
            network = "loopback"
            version = model_version(package_dir, files, result)
            env: dict[str, str] = {}
            sources: dict[str, str] = {}
            overrides = override_for(name, package_dir, files, every_package)
            warn_shadowed(name, package_dir, overrides)
            for path, override in overrides:
                resources, scaling = override.apply(resources, scaling)
                device = override.device or device
                network = override.network or network
                version = override.version or version
                env.update(override.env or {})
                for section in ("resources", "scaling"):
                    value = getattr(override, section)
                    for key in value.model_fields_set if value is not None else ():
                        sources[f"{section}.{key}"] = str(path)
            try:
                sequence = sequence_for(name, package_dir, files, overrides, engine["inputs"])
            except ValueError as exc:
                discovery.failures.append(PackageFailure(package_dir, str(exc)))
                continue
            controls = sequence.inputs() if sequence is not None else {}
            discovery.models.append(
                ModelSpec(
                    name=name,
                    task=engine["task"],
                    description=engine["description"],
                    package=result["package"],
                    package_dir=package_dir,
                    python=pythons[package_dir],
                    engine_class=engine["class"],
                    inputs=[t for t in engine["inputs"] if t["name"] not in controls],
                    outputs=engine["outputs"],
                    input_schema=engine["input_schema"],
                    output_schema=engine["output_schema"],
                    resources=resources,
                    scaling=scaling,
                    max_batch_size=engine["max_batch_size"],
                    batch_dimension=engine.get("batch_dimension") is True,
                    device=device,
                    is_async=bool(engine.get("async", False)),
                    streaming=bool(engine.get("streaming", False)),
                    env=env,
                    network=network,
                    sources=sources,
                    input_schema_exact=engine.get("input_schema_exact") is True,
                    warmup=warmup if isinstance(warmup := engine.get("warmup"), dict) else None,
                    version=version,
                    sequence=sequence,
                )
            )
    return discovery
