"""Finding engines: a typed wrapper over pluggy for the ``omni`` entry-point group."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pluggy

from omni_sdk import hookspecs
from omni_sdk._engine import Engine, EngineDefinitionError
from omni_sdk.model_config import ModelConfig, is_zero_code, read_model_config

__all__ = ["ENTRY_POINT_GROUP", "EnginePlugins", "PackageError", "read_package"]

ENTRY_POINT_GROUP = "omni"
log = logging.getLogger("omni.plugins")


class PackageError(Exception):
    """A model package cannot be loaded; the message names the package and the cause."""


class EnginePlugins:
    """The plugins of one process and the engines they register.

    ``OMNI_LOAD_PLUGINS`` (comma-separated entry-point names) limits which installed plugins
    load; ``OMNI_TRACE_PLUGINS=1`` prints every hook call to stderr.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        # The distribution version of the package last loaded, where it serves an installed
        # distribution (``[tool.omni] engines-from``); None for a package of its own.
        self.version: str | None = None
        self._pm.add_hookspecs(hookspecs)
        if os.environ.get("OMNI_TRACE_PLUGINS"):
            self._pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            self._pm.enable_tracing()

    def register(self, plugin: object, name: str | None = None) -> None:
        self._pm.register(plugin, name=name)

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)

    def load_installed(self, only: set[str] | None = None) -> None:
        """Load the ``omni`` entry points of installed distributions (those named in ``only``,
        if given), minus any ``OMNI_LOAD_PLUGINS`` does not allow."""
        allowed = _allow_list()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and entry_point.name not in allowed:
                continue
            if only is not None and entry_point.name not in only:
                continue
            if self._pm.get_plugin(entry_point.name) is not None:
                continue
            self._pm.register(entry_point.load(), name=entry_point.name)
        self._pm.check_pending()

    def load_package(self, package_dir: Path) -> str:
        """Load the plugins a model package declares in its pyproject.toml; returns its name.

        A zero-code package (an omni.toml with a ``[model]`` table and no pyproject.toml) is
        built by the engine kind it names, from the installed engine plugins.
        """
        if is_zero_code(package_dir):
            return self.load_zero_code(package_dir)
        info = read_package(package_dir)
        for root in (package_dir / "src", package_dir):
            if root.is_dir() and str(root) not in sys.path:
                sys.path.insert(0, str(root))
        for ep_name, target in info["entry_points"].items():
            try:
                plugin = _import_target(target)
            except Exception as exc:
                raise PackageError(
                    f"package {package_dir}: entry point {ep_name} = {target!r} failed to "
                    f"import: {type(exc).__name__}: {exc}"
                ) from exc
            self._pm.register(plugin, name=f"{info['name']}:{ep_name}")
        self.version = info.get("version")
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PackageError(f"package {package_dir}: {exc}") from exc
        return str(info["name"])

    def load_zero_code(self, package_dir: Path) -> str:
        """Build the engine of a zero-code package with its kind's factory; returns its name."""
        try:
            config = read_model_config(package_dir)
        except ValueError as exc:
            raise PackageError(str(exc)) from None
        # Engine kinds come from installed plugins, in a manager of their own: the engines
        # those plugins register are not this package's. A plugin named like the kind (the
        # built-in engines: onnx, torch, triton) is tried alone first, so serving one graph
        # does not import every installed plugin.
        installed = EnginePlugins()
        installed.load_installed(only={config.kind})
        kinds = installed.engine_kinds()
        if config.kind not in kinds:
            installed.load_installed()
            kinds = installed.engine_kinds()
        factory = kinds.get(config.kind)
        if factory is None:
            known = ", ".join(sorted(kinds)) or "none: install omni-engine-onnx, say"
            raise PackageError(
                f"{config.where()}: kind {config.kind!r} is not registered by any installed "
                f"engine plugin (registered kinds: {known})"
            )
        try:
            engine = factory(config)
        except (ValueError, EngineDefinitionError) as exc:
            raise PackageError(str(exc)) from None
        except Exception as exc:
            raise PackageError(
                f"{config.where()}: kind {config.kind!r} could not build an engine: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._pm.register(_Registers(engine), name=f"zero-code:{config.name}")
        return package_dir.name

    def engine_kinds(self) -> dict[str, Callable[[ModelConfig], type[Engine]]]:
        """Every engine kind the loaded plugins register, by name."""
        kinds: dict[str, Callable[[ModelConfig], type[Engine]]] = {}

        def register(kind: str, factory: Callable[[ModelConfig], type[Engine]]) -> None:
            if kind in kinds and kinds[kind] is not factory:
                raise EngineDefinitionError(f"two plugins register the engine kind {kind!r}")
            kinds[kind] = factory

        self._pm.hook.register_engine_kinds(register=register)
        return kinds

    def engines(self, registered: list[str] | None = None) -> list[type[Engine]]:
        """Every engine the loaded plugins register, checked, with unique names.

        ``registered`` gets each engine's name as it registers, before it is checked (a check
        may fail: a TritonEngine that cannot reach its remote server, say).
        """
        found: list[type[Engine]] = []

        def register(engine: type[Engine]) -> None:
            if not (isinstance(engine, type) and issubclass(engine, Engine)):
                raise EngineDefinitionError(f"register() takes an Engine subclass, got {engine!r}")
            if registered is not None and isinstance(engine.name, str):
                registered.append(engine.name)
            engine.validate_definition()
            found.append(engine)

        self._pm.hook.register_engines(register=register)
        by_name: dict[str, type[Engine]] = {}
        for engine in found:
            other = by_name.setdefault(engine.name, engine)
            if other is not engine:
                raise EngineDefinitionError(
                    f"two engines are named {engine.name!r}: {_where(other)} and {_where(engine)}"
                )
        return list(by_name.values())


class _Registers:
    """An inline plugin registering one engine (a zero-code package's)."""

    def __init__(self, engine: type[Engine]) -> None:
        self.engine = engine

    @hookspecs.hookimpl
    def register_engines(self, register: Callable[[type[Engine]], None]) -> None:
        register(self.engine)


def read_package(package_dir: Path) -> dict[str, Any]:
    """Name and ``omni`` entry points from a model package's pyproject.toml."""
    pyproject = package_dir / "pyproject.toml"
    if not package_dir.is_dir():
        raise PackageError(f"model package {package_dir} does not exist")
    if not pyproject.is_file():
        raise PackageError(f"model package {package_dir} has no pyproject.toml")
    try:
        data = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{pyproject} is not valid TOML: {exc}") from exc
    project = data.get("project", {})
    name = project.get("name")
    entry_points = project.get("entry-points", {}).get(ENTRY_POINT_GROUP)
    if not isinstance(name, str):
        raise PackageError(f"{pyproject} has no [project] name")
    tool = data.get("tool", {}).get("omni", {})
    engines_from = tool.get("engines-from") if isinstance(tool, dict) else None
    if engines_from is not None:
        if entry_points:
            raise PackageError(
                f"{pyproject}: [tool.omni] engines-from and [project.entry-points.omni] are both "
                "set; keep one"
            )
        return _installed_engines(pyproject, engines_from)
    if not entry_points or not isinstance(entry_points, dict):
        raise PackageError(
            f"{pyproject} registers no engine: add [project.entry-points.omni] with a line "
            'such as `my_model = "my_model"` naming the module that holds the hookimpl'
        )
    return {"name": name, "entry_points": entry_points}


def _installed_engines(pyproject: Path, distribution: object) -> dict[str, Any]:
    """Name, version and ``omni`` entry points of the installed distribution that a package's
    ``[tool.omni] engines-from`` names (a package that serves a published model package: its
    only dependency, installed in its environment)."""
    if not isinstance(distribution, str) or not distribution:
        raise PackageError(f"{pyproject}: [tool.omni] engines-from must name a distribution")
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackageError(
            f"{pyproject}: [tool.omni] engines-from names {distribution!r}, which is not "
            "installed in the package's environment (list it in [project] dependencies)"
        ) from None
    entry_points = {ep.name: ep.value for ep in found.entry_points.select(group=ENTRY_POINT_GROUP)}
    if not entry_points:
        raise PackageError(
            f"distribution {distribution} {found.version} (named by {pyproject}) registers no "
            "engine: it has no [project.entry-points.omni]"
        )
    return {"name": found.metadata["Name"], "version": found.version, "entry_points": entry_points}


def _import_target(target: str) -> object:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name.strip())
    obj: object = module
    for part in filter(None, attribute.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _allow_list() -> set[str] | None:
    raw = os.environ.get("OMNI_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _where(engine: type[Engine]) -> str:
    return f"{engine.__module__}.{engine.__qualname__}"


def iter_engines(plugins: Iterable[object]) -> list[type[Engine]]:
    """The engines registered by the given plugin objects (handy in tests)."""
    manager = EnginePlugins()
    for index, plugin in enumerate(plugins):
        manager.register(plugin, name=f"inline-{index}")
    return manager.engines()
