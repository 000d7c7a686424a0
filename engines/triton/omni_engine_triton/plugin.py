"""The ``omni`` entry point of omni-engine-triton.

It registers no engine of its own: ``TritonEngine`` is a base class that model packages
subclass and register. Loading through the entry point, as any third-party plugin does,
makes the engine's presence visible to ``omni-runtime models`` and plugin tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_sdk import hookimpl


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    """TritonEngine is a base class; model packages register their subclasses."""
