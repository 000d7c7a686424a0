"""Zero-code packages: the [model] table, engine kinds and their errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omni_sdk import Engine, EngineDefinitionError, EnginePlugins, ModelConfig, PackageError
from omni_sdk.model_config import is_zero_code, read_model_config


def _write(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "omni.toml").write_text(text)
    return directory


def test_a_model_table_makes_a_directory_a_zero_code_package(tmp_path: Path) -> None:
    package = _write(
        tmp_path / "m", '[model]\nname = "@t/m"\ntask = "t"\nkind = "onnx"\nfile = "x"\n'
    )
    assert is_zero_code(package)
    config = read_model_config(package)
    assert (config.name, config.kind, config.setting("file")) == ("@t/m", "onnx", "x")
    with pytest.raises(ValueError, match="file = 'x': no such file"):
        config.file()
    with pytest.raises(ValueError, match="needs the field 'inputs'"):
        config.tensors("inputs")
    (package / "pyproject.toml").write_text("")
    assert not is_zero_code(package)  # a Python package after all


def test_a_table_without_a_kind_names_the_field(tmp_path: Path) -> None:
    package = _write(tmp_path / "m", '[model]\nname = "@t/m"\ntask = "t"\n')
    with pytest.raises(ValueError, match=r"omni.toml \[model\]: field 'kind': Field required"):
        read_model_config(package)


class _Kinds:
    def __init__(self, kind: str, factory: Any = None) -> None:
        self.kind = kind
        self.factory = factory or _build

    from omni_sdk import hookimpl

    @hookimpl
    def register_engine_kinds(self, register: Any) -> None:
        register(self.kind, self.factory)


def _build(config: ModelConfig) -> type[Engine]:
    raise ValueError(f"{config.where()}: no")


def test_kinds_come_from_plugins_and_may_not_clash() -> None:
    plugins = EnginePlugins()
    plugins.register(_Kinds("echo"), name="a")
    assert plugins.engine_kinds() == {"echo": _build}
    plugins.register(_Kinds("echo", factory=lambda config: _build(config)), name="b")
    with pytest.raises(EngineDefinitionError, match="two plugins register the engine kind 'echo'"):
        plugins.engine_kinds()


def test_the_built_in_kinds_are_registered_through_their_entry_points(tmp_path: Path) -> None:
    plugins = EnginePlugins()
    plugins.load_installed(only={"onnx", "torch", "triton"})
    assert {"onnx", "torch", "triton"} <= set(plugins.engine_kinds())
    package = _write(
        tmp_path / "t", '[model]\nname = "@t/t"\ntask = "t"\nkind = "torch"\nfile = "m.pt"\n'
    )
    with pytest.raises(PackageError, match="no such file"):
        EnginePlugins().load_package(package)
