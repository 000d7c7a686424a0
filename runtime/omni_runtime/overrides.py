"""Which ``[models."X"]`` entries of which omni.toml apply to a package's models, and in what
order: the repository's (and ``--config``'s) for every package, a package's own for its models
alone; and a warning where the package's own file replaces a repository-level setting."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omni_runtime.config import CONFIG_NAME, ModelOverride, OmniFile
from omni_sdk.sequences import SequenceControls
from omni_sdk.units import format_size

log = logging.getLogger("omni.discovery")  # its warnings come while discovery runs


def own_overrides(package_dir: Path, files: dict[Path, OmniFile]) -> list[ModelOverride]:
    """The entries of the package's own omni.toml: they apply to no other package's models."""
    return [o for path, f in files.items() if path.parent == package_dir for o in f.models.values()]


def shared_overrides(
    names: list[str], files: dict[Path, OmniFile], packages: list[Path]
) -> list[ModelOverride]:
    """The repository's (and --config's) entries for the models ``names``."""
    return [
        f.models[name]
        for path, f in files.items()
        if path.parent not in packages
        for name in names
        if name in f.models
    ]


def override_for(
    name: str, package_dir: Path, files: dict[Path, OmniFile], packages: list[Path]
) -> list[tuple[Path, ModelOverride]]:
    """The overrides that apply to one model, with their files, least specific first.

    Repository-root and explicit files apply to every package; a package's own omni.toml only
    to that package's engines, never to a neighbour's.
    """
    applicable = [
        (path, f)
        for path, f in files.items()
        if path.parent == package_dir or path.parent not in packages
    ]
    ordered = sorted(applicable, key=lambda item: item[0].parent == package_dir)
    return [(path, f.models[name]) for path, f in ordered if name in f.models]


def _settings(override: ModelOverride) -> dict[str, Any]:
    """What one ``[models."X"]`` table sets, by dotted name ("scaling.max_replicas")."""
    settings: dict[str, Any] = {}
    for section in ("resources", "scaling"):
        value = getattr(override, section)
        for key in sorted(value.model_fields_set) if value is not None else ():
            settings[f"{section}.{key}"] = getattr(value, key)
    for key in ("device", "network"):
        if getattr(override, key) is not None:
            settings[key] = getattr(override, key)
    for key, value in (override.env or {}).items():
        settings[f"env.{key}"] = value
    return settings


def warn_shadowed(
    name: str, package_dir: Path, overrides: list[tuple[Path, ModelOverride]]
) -> None:
    """A repository-level setting that the package's own omni.toml replaces is easy to miss:
    the operator edits the repository's file and nothing changes. Say which file wins."""
    own = [(path, o) for path, o in overrides if path.parent == package_dir]
    if not own:
        return
    own_path, own_settings = own[-1][0], _settings(own[-1][1])
    for path, override in overrides:
        if path.parent == package_dir:
            continue
        for setting, value in _settings(override).items():
            if setting in own_settings and own_settings[setting] != value:
                log.warning(
                    "%s sets %s%s for model %r, but the package's own %s sets it%s, which "
                    "wins; change it there, or remove it from one of the two files",
                    path, setting, _shown(setting, value), name, own_path,
                    _shown(setting, own_settings[setting], " to "),
                )  # fmt: skip


def _shown(setting: str, value: Any, prefix: str = " = ") -> str:
    if setting.startswith("env."):
        return ""  # the value may be a secret
    if setting in ("resources.memory", "resources.gpu_memory") and isinstance(value, int):
        return prefix + format_size(value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{prefix}{value:g}" if number else f"{prefix}{value!r}"


def sequence_for(
    name: str,
    package_dir: Path,
    files: dict[Path, OmniFile],
    overrides: list[tuple[Path, ModelOverride]],
    inputs: list[dict[str, Any]],
) -> SequenceControls | None:
    """A model's sequence controls: a zero-code package's ``[model.sequence]``, replaced by the
    most specific ``[models."X".sequence]``. ``ValueError`` when one names no input of it."""
    own = files.get(package_dir / CONFIG_NAME)
    sequence = own.model.sequence if own is not None and own.model is not None else None
    where = f"{package_dir / CONFIG_NAME} [model.sequence]"
    for path, override in overrides:
        if override.sequence is not None:
            sequence, where = override.sequence, f'{path} [models."{name}".sequence]'
    if sequence is None:
        return None
    names = [str(t["name"]) for t in inputs]
    for input_name, control in sequence.inputs().items():
        if input_name not in names:
            raise ValueError(
                f"{where}: {control} = {input_name!r} names no input of model {name!r} (its "
                f"inputs: {', '.join(names) or 'none'})"
            )
    return sequence
