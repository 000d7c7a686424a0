"""The ``omni`` entry point of omni-engine-onnx: the ``onnx`` engine kind.

``OnnxEngine`` itself is a base class that model packages subclass and register. The ``onnx``
kind serves a zero-code package: an ``omni.toml`` naming a graph, no Python.

    [model]
    name = "@cf/acme/detector"
    task = "object-detection"
    kind = "onnx"
    file = "model.onnx"        # relative to the package directory
    max_batch_size = 8         # optional: rows of dimension 0 batched together
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_engine_onnx._engine import OnnxEngine
from omni_sdk import Engine, ModelConfig, hookimpl


def build(config: ModelConfig) -> type[Engine]:
    """An OnnxEngine for the graph ``file`` names; inputs and outputs come from the graph."""
    attributes = {
        "name": config.name,
        "task": config.task,
        "description": config.description or f"{config.file().name}, served by the onnx kind",
        "model_file": str(config.file()),
        "max_batch_size": int(config.setting("max_batch_size", 0)),
        "__module__": __name__,
    }
    return type("OnnxKindEngine", (OnnxEngine,), attributes)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    """OnnxEngine is a base class; model packages register their subclasses."""


@hookimpl
def register_engine_kinds(
    register: Callable[[str, Callable[[ModelConfig], type[Engine]]], None],
) -> None:
    register("onnx", build)
