"""Zero-code model packages: a directory with an ``omni.toml`` whose ``[model]`` table names an
engine *kind*, and no Python at all.

    [model]
    name = "@cf/acme/detector"
    task = "object-detection"
    kind = "onnx"              # registered by an engine plugin (register_engine_kinds)
    file = "model.onnx"        # kind-specific fields follow

An engine distribution registers a kind with ``register(kind, factory)``; ``factory(config)``
returns an Engine class built from the ``ModelConfig``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from omni_sdk._tensor_engine import Tensor

__all__ = ["CONFIG_NAME", "ModelConfig", "is_zero_code", "read_model_config"]

CONFIG_NAME = "omni.toml"


class ModelConfig(BaseModel):
    """A zero-code package's ``[model]`` table, and the directory it came from."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    task: str
    kind: str
    description: str = ""
    directory: Path

    def where(self) -> str:
        return f"{self.directory / CONFIG_NAME} [model]"

    def setting(self, key: str, default: Any = None) -> Any:
        """A kind-specific field (``file``, ``url``, ...), or ``default``."""
        return (self.model_extra or {}).get(key, default)

    def required(self, key: str) -> Any:
        value = self.setting(key)
        if value is None or value == "":
            raise ValueError(f"{self.where()}: kind {self.kind!r} needs the field '{key}'")
        return value

    def file(self, key: str = "file") -> Path:
        """The file a field names, relative to the package directory; it must exist."""
        path = (self.directory / str(self.required(key))).resolve()
        if not path.is_file():
            raise ValueError(f"{self.where()}: {key} = {self.setting(key)!r}: no such file {path}")
        return path

    def tensors(self, key: str) -> list[Tensor]:
        """``[[model.inputs]]``-style tables of ``name``, ``datatype`` and ``shape``."""
        tables = self.required(key)
        if not isinstance(tables, list):
            raise ValueError(f"{self.where()}: {key} must be a list of tables ([[model.{key}]])")
        tensors = []
        for index, table in enumerate(tables):
            try:
                tensors.append(
                    Tensor(str(table["name"]), str(table["datatype"]), tuple(table["shape"]))
                )
            except (KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.where()}: {key}[{index}] needs name, datatype and shape ({exc})"
                ) from None
        return tensors


def is_zero_code(directory: Path) -> bool:
    """A directory without pyproject.toml whose omni.toml has a ``[model]`` table."""
    config = directory / CONFIG_NAME
    if (directory / "pyproject.toml").exists() or not config.is_file():
        return False
    try:
        return isinstance(tomllib.loads(config.read_text()).get("model"), dict)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def read_model_config(directory: Path) -> ModelConfig:
    """``directory/omni.toml``'s ``[model]`` table; ``ValueError`` naming the file and field."""
    path = directory / CONFIG_NAME
    try:
        table = tomllib.loads(path.read_text()).get("model")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(table, dict):
        raise ValueError(f"{path}: no [model] table (name, task and kind of a zero-code package)")
    try:
        return ModelConfig.model_validate({**table, "directory": directory.resolve()})
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(map(str, e['loc']))}': {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(f"{path} [model]: {problems}") from None
