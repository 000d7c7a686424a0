"""Hook specifications of the ``omni`` pluggy project."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from omni_sdk._engine import Engine

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("omni")
hookimpl = pluggy.HookimplMarker("omni")


@hookspec
def register_engines(register: Callable[[type[Engine]], None]) -> None:
    """Call ``register(EngineSubclass)`` once for each engine this plugin provides."""
