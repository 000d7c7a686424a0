"""Hook specifications of the ``omni`` pluggy project."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from omni_sdk._engine import Engine
    from omni_sdk.model_config import ModelConfig

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("omni")
hookimpl = pluggy.HookimplMarker("omni")


@hookspec
def register_engines(register: Callable[[type[Engine]], None]) -> None:
    """Call ``register(EngineSubclass)`` once for each engine this plugin provides."""


@hookspec
def register_engine_kinds(
    register: Callable[[str, Callable[[ModelConfig], type[Engine]]], None],
) -> None:
    """Call ``register(kind, factory)`` for each engine kind: ``factory(config)`` builds an
    Engine class from a zero-code package's ``[model]`` table (a ``ModelConfig``)."""
