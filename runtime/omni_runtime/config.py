"""``omni.toml``: per-deployment overrides of engines' resources and scaling, and server limits.

    [server]
    max_body_size = "64MiB"

    [models."@cf/baai/bge-small-en-v1.5".resources]
    memory = "4GiB"

    [models."@cf/baai/bge-small-en-v1.5".scaling]
    max_replicas = 2

    [scheduler]
    host_memory = "48GiB"

A file beside a model package (in its directory) wins over one at the repository root (the
directory given to ``serve`` that holds the packages), which wins over the engine's defaults.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from omni_sdk import Resources, Scaling
from omni_sdk.sequences import SequenceControls
from omni_sdk.units import Bytes, Seconds

__all__ = [
    "ConfigError",
    "ModelOverride",
    "OmniFile",
    "SchedulerSettings",
    "ServerSettings",
    "NodeConfig",
    "command_line_server",
    "load_omni_file",
    "node_config",
    "repository_server",
]

CONFIG_NAME = "omni.toml"
log = logging.getLogger("omni.config")

# What a model's version may be: it is sent in a header and written into paths and labels.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class ConfigError(Exception):
    """A configuration file is wrong; the message names the file, the field and what is allowed."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_size: Bytes = Field(default=64 << 20, description="larger bodies get 413")
    load_timeout: Seconds = Field(
        default=600.0,
        gt=0,
        description="how long a request may wait in its model's queue (for a replica to start, "
        "for memory, or for room on a replica) before a 503",
    )
    drain_timeout: Seconds = Field(
        default=30.0,
        gt=0,
        description="how long stopping a replica (or the runtime) waits for requests",
    )
    shm_threshold: Bytes = Field(
        default=256 << 10, description="payloads this large travel as a memfd"
    )
    heartbeat_timeout: Seconds = Field(
        default=60.0, gt=0, description="a worker silent this long while owing an answer is killed"
    )
    body_timeout: Seconds = Field(
        default=30.0,
        gt=0,
        description="a request (its headers and body) not received within this of its first "
        "byte gets 408 and the connection is closed",
    )
    max_header_size: Bytes = Field(
        default=16 << 10,
        gt=0,
        description="a request line and headers larger than this get 431 and the connection "
        "is closed",
    )
    max_tensor_elements: int = Field(
        default=1 << 24,  # omni_sdk._tensors.DEFAULT_MAX_TENSOR_ELEMENTS: 64 MiB of FP32
        gt=0,
        description="a v2 input whose shape holds more elements gets 400",
    )
    batch_max_size: Bytes = Field(
        default=10 << 20,
        gt=0,
        description="the largest asynchronous batch submission (queueRequest); larger get 413",
    )
    batch_retention: Seconds = Field(
        default=86400.0,
        gt=0,
        description="how long a finished batch's results are kept before they expire",
    )
    max_connections: int = Field(
        default=1000,
        gt=0,
        description="open client connections at most; at the limit the longest-idle one is "
        "closed for a new one, or the new one when none is idle",
    )
    cache_quota: Bytes = Field(
        default=0,
        ge=0,
        description="each model's cache directory is a filesystem of this size (an ext4 image, "
        "loop-mounted); 0: no quota",
    )
    source_builds: bool = Field(
        default=False,
        description="let model packages' dependencies build from source (their build code runs "
        "in the sandbox, as a user of the package's own); otherwise wheels only",
    )
    grpc_server: Literal["omni", "grpcio"] = Field(
        default="omni",
        description='what serves --grpc-port: "omni", its own HTTP/2 server on the event loop, '
        'or "grpcio", grpcio\'s asyncio server (several times the CPU per call)',
    )
    busy_poll: Seconds = Field(
        default=0.0003,
        ge=0,
        description="while a worker's answer is due, the runtime polls for it this long before "
        "it sleeps, and one worker at a time, where a core is spare, polls for its next request "
        "(waking a process costs 30-150 us on a virtual machine); 0: never (docs/architecture.md)",
    )


class SchedulerSettings(BaseModel):
    """``[scheduler]``: the node's memory budgets and the autoscaler's windows."""

    model_config = ConfigDict(extra="forbid")

    host_memory: Bytes | None = Field(
        default=None,
        gt=0,
        description="budget for all replicas on this node; default: the node's memory "
        "(its cgroup limit, else MemTotal) minus 1 GiB for the runtime",
    )
    gpu_overcommit: float = Field(
        default=4.0,
        gt=0,
        description="a GPU's replicas may be promised this multiple of its memory",
    )
    stable_window: Seconds = Field(default=60.0, gt=0, description="autoscaling averages over this")
    panic_window: Seconds = Field(
        default=6.0, gt=0, description="...and reacts within this when demand doubles"
    )
    gpus: dict[str, Bytes] | None = Field(
        default=None,
        description='each GPU\'s memory by device, e.g. {"cuda:0" = "80GiB"}; default: what '
        "nvidia-smi reports (set it to plan with less than the card has)",
    )
    prewarm_timeout: Seconds = Field(
        default=3600.0,
        ge=0,
        description="a pre-warmed process per environment that has served forks its workers "
        "until none of its models has had a request for this long; 0 turns pre-warming off",
    )

    @field_validator("gpus")
    @classmethod
    def _devices(cls, gpus: dict[str, int] | None) -> dict[str, int] | None:
        for device in gpus or {}:
            if not re.fullmatch(r"cuda:\d+", device):
                raise ValueError(f"a GPU is named like 'cuda:0', not {device!r}")
        return gpus

    @model_validator(mode="after")
    def _windows(self) -> SchedulerSettings:
        if self.panic_window > self.stable_window:
            raise ValueError(
                f"panic_window ({self.panic_window:g}s) must not be longer than "
                f"stable_window ({self.stable_window:g}s)"
            )
        return self


class ModelOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resources: Resources | None = None
    scaling: Scaling | None = None
    device: str | None = None
    env: dict[str, str] | None = Field(
        default=None, description="environment variables the model's workers get"
    )
    network: Literal["host", "loopback"] | None = Field(
        default=None,
        description='"loopback" (the default): a network namespace of its own with loopback '
        'only; "host": the node\'s network (a model that calls a remote server)',
    )
    version: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=VERSION_PATTERN.pattern,
        description="the model's version (default: its package's distribution version)",
    )
    sequence: SequenceControls | None = Field(
        default=None, description="the control inputs of a stateful model (docs/http-api.md)"
    )

    def apply(self, resources: Resources, scaling: Scaling) -> tuple[Resources, Scaling]:
        """Only the fields the file sets replace the engine's defaults."""
        if self.resources is not None:
            resources = resources.model_copy(
                update={k: getattr(self.resources, k) for k in self.resources.model_fields_set}
            )
        if self.scaling is not None:
            scaling = scaling.model_copy(
                update={k: getattr(self.scaling, k) for k in self.scaling.model_fields_set}
            )
        return resources, scaling


class ZeroCodeModel(BaseModel):
    """``[model]``: a zero-code package's model; fields beyond these belong to its kind."""

    model_config = ConfigDict(extra="allow")

    name: str
    task: str
    kind: str
    sequence: SequenceControls | None = None  # [model.sequence]


class OmniFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings | None = None
    scheduler: SchedulerSettings | None = None
    models: dict[str, ModelOverride] = Field(default_factory=dict)
    # A zero-code package's own model (name, task, kind, kind-specific fields); the engine
    # kind checks the rest when it builds the engine.
    model: ZeroCodeModel | None = None


def load_omni_file(path: Path) -> OmniFile:
    """Parse and check one omni.toml; raise ``ConfigError`` naming the file and field."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return OmniFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc, data)}") from None


def _describe(exc: ValidationError, data: dict[str, Any]) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        where = ".".join(f'"{p}"' if isinstance(p, str) and "/" in p else str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_fields(loc[:-1]))
            problems.append(f"unknown field '{where}' (allowed here: {allowed})")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"field '{where}': {message} (got {error.get('input')!r})")
    return "; ".join(problems)


def _allowed_fields(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = OmniFile
    for part in parent:
        if model is OmniFile and part == "models":
            continue
        if model is OmniFile and part == "server":
            model = ServerSettings
        elif model is OmniFile and part == "scheduler":
            model = SchedulerSettings
        elif model is OmniFile and part == "model":
            model = ZeroCodeModel
        elif model is OmniFile:
            model = ModelOverride
        elif model is ModelOverride and part == "resources":
            model = Resources
        elif model is ModelOverride and part == "scaling":
            model = Scaling
        elif part == "sequence":  # [models."X".sequence], or a zero-code [model.sequence]
            model = SequenceControls
    return list(model.model_fields)


@dataclass
class NodeConfig:
    """The node-wide tables, merged from every repository-level omni.toml."""

    server: ServerSettings = field(default_factory=ServerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    scheduler_sources: dict[str, str] = field(default_factory=dict)  # field -> file that set it


def node_config(files: dict[Path, OmniFile], packages: set[Path] | None = None) -> NodeConfig:
    """``[server]`` and ``[scheduler]`` from the files that are not a package's own.

    ``serve`` and ``simulate --config`` both read them here, so a file means the same to both;
    raise ``ConfigError`` naming the files when their ``[scheduler]`` tables contradict.
    """
    packages = packages or set()
    node = NodeConfig()
    for path, omni_file in files.items():
        for table in ("server", "scheduler"):
            if getattr(omni_file, table) is not None and path.parent in packages:
                log.warning(
                    "%s: [%s] applies only in the repository's omni.toml; ignored", path, table
                )
        if path.parent in packages:
            continue
        if omni_file.server is not None:
            node.server = node.server.model_copy(
                update={k: getattr(omni_file.server, k) for k in omni_file.server.model_fields_set}
            )
        if omni_file.scheduler is not None:
            fields = omni_file.scheduler.model_fields_set
            node.scheduler_sources |= dict.fromkeys(fields, str(path))
            merged = node.scheduler.model_dump() | {
                k: getattr(omni_file.scheduler, k) for k in fields
            }
            try:
                node.scheduler = SchedulerSettings.model_validate(merged)
            except ValidationError as exc:
                setters = ", ".join(sorted(set(node.scheduler_sources.values())))
                message = "; ".join(
                    e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False)
                )
                raise ConfigError(f"[scheduler] as {setters} set it: {message}") from None
    return node


def repository_server(files: dict[Path, OmniFile], packages: list[Path]) -> ServerSettings:
    """``[server]`` as the repository's omni.toml and ``--config`` set it (never a package's).

    What isolation and environments need before discovery; ``node_config`` reads the same.
    """
    settings = ServerSettings()
    for path, omni_file in files.items():
        if omni_file.server is not None and path.parent not in packages:
            fields = omni_file.server.model_fields_set
            settings = settings.model_copy(update={k: getattr(omni_file.server, k) for k in fields})
    return settings


def command_line_server(settings: ServerSettings, options: dict[str, Any]) -> ServerSettings:
    """``settings`` with what the command line set (``{"max_body_size": "2MB"}``; None: not
    given), which wins over every file; ``ConfigError`` names the option that is wrong."""
    update = {}
    for name, value in options.items():
        if value is None:
            continue
        try:
            update[name] = getattr(ServerSettings.model_validate({name: value}), name)
        except ValidationError as exc:
            message = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            raise ConfigError(f"--{name.replace('_', '-')}: {message}") from None
    return settings.model_copy(update=update)
