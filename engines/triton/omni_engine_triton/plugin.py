"""The ``omni`` entry point of omni-engine-triton: the ``triton`` engine kind.

``TritonEngine`` itself is a base class that model packages subclass and register. The
``triton`` kind forwards a zero-code package's model to a model on another v2 server:

    [model]
    name = "@cf/acme/remote"
    task = "text-classification"
    kind = "triton"
    url = "http://triton.internal:8000"
    remote_model = "classifier"
    remote_version = ""        # optional

    [models."@cf/acme/remote"]
    network = "host"           # it needs the network: a worker has only loopback by default
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_engine_triton._engine import TritonEngine
from omni_sdk import Engine, ModelConfig, hookimpl


def build(config: ModelConfig) -> type[Engine]:
    """A TritonEngine forwarding to ``remote_model`` at ``url``."""
    attributes = {
        "name": config.name,
        "task": config.task,
        "description": config.description
        or f"{config.required('remote_model')} at {config.required('url')}",
        "url": str(config.required("url")),
        "remote_model": str(config.required("remote_model")),
        "remote_version": str(config.setting("remote_version", "")),
        "__module__": __name__,
    }
    return type("TritonKindEngine", (TritonEngine,), attributes)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    """TritonEngine is a base class; model packages register their subclasses."""


@hookimpl
def register_engine_kinds(
    register: Callable[[str, Callable[[ModelConfig], type[Engine]]], None],
) -> None:
    register("triton", build)
