"""The ``omni`` entry point of omni-engine-torch: the ``torch`` engine kind.

``TorchEngine`` itself is a base class that model packages subclass and register. The ``torch``
kind serves a zero-code package: an ``omni.toml`` naming a saved program, no Python.

    [model]
    name = "@cf/acme/scorer"
    task = "tabular-regression"
    kind = "torch"
    file = "model.pt2"         # torch.export.save (.pt2) or torch.jit.save (.pt)
    [[model.inputs]]           # called with the inputs as positional tensors, in this order
    name = "x"
    datatype = "FP32"
    shape = [-1, 4]
    [[model.outputs]]
    name = "y"
    datatype = "FP32"
    shape = [-1, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_engine_torch._engine import TorchEngine
from omni_sdk import Engine, ModelConfig, hookimpl


def build(config: ModelConfig) -> type[Engine]:
    """A TorchEngine for the program ``file`` names, with the declared inputs and outputs."""
    attributes = {
        "name": config.name,
        "task": config.task,
        "description": config.description or f"{config.file().name}, served by the torch kind",
        "model_file": str(config.file()),
        "inputs": config.tensors("inputs"),
        "outputs": config.tensors("outputs"),
        "max_batch_size": int(config.setting("max_batch_size", 0)),
        "__module__": __name__,
    }
    return type("TorchKindEngine", (TorchEngine,), attributes)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    """TorchEngine is a base class; model packages register their subclasses."""


@hookimpl
def register_engine_kinds(
    register: Callable[[str, Callable[[ModelConfig], type[Engine]]], None],
) -> None:
    register("torch", build)
