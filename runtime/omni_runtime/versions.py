"""A discovered model's version: its zero-code ``[model] version``, else the version of the
installed distribution its package serves, else its pyproject's ``[project] version``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from omni_runtime.config import CONFIG_NAME, VERSION_PATTERN, ConfigError, OmniFile, load_omni_file

__all__ = ["model_version"]


def model_version(package_dir: Path, files: dict[Path, OmniFile], result: dict[str, Any]) -> str:
    """The version of the models ``package_dir``'s discovery ``result`` describes (an omni.toml
    ``[models."X"] version`` still overrides it, see ``discover_all``)."""
    return (
        _zero_code_version(package_dir, files)
        or _served_version(result)
        or _distribution_version(package_dir)
    )


def _distribution_version(package_dir: Path) -> str:
    """``[project] version`` of the package's pyproject.toml; "1" where it has none (a
    dynamic version, or a file that cannot be read: discovery reports those)."""
    try:
        project = tomllib.loads((package_dir / "pyproject.toml").read_text()).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "1"
    version = project.get("version") if isinstance(project, dict) else None
    return version if isinstance(version, str) and VERSION_PATTERN.match(version) else "1"


def _served_version(result: dict[str, Any]) -> str | None:
    """The version of the installed distribution a package serves (``[tool.omni]
    engines-from``), as its discovery reported it; None for a package of its own."""
    version = result.get("version")
    return version if isinstance(version, str) and VERSION_PATTERN.match(version) else None


def _zero_code_version(package_dir: Path, files: dict[Path, OmniFile]) -> str | None:
    """``version`` in a zero-code package's ``[model]`` table (read from its omni.toml where
    the files read at start do not hold it: a package added while serving)."""
    own = files.get(package_dir / CONFIG_NAME)
    if own is None and (package_dir / CONFIG_NAME).is_file():
        try:
            own = load_omni_file(package_dir / CONFIG_NAME)
        except ConfigError:
            return None  # discovery reports what is wrong with it
    model = own.model if own is not None else None
    version = getattr(model, "version", None) if model is not None else None
    return str(version) if version else None
