"""Omni SDK: what a model author imports to serve a model with omni-runtime.

The names below are for model authors. The contracts between the SDK and omni-runtime have
their own public modules, and the runtime imports nothing else of the SDK:
``omni_sdk.wire`` (the framed protocol to a worker), ``omni_sdk.units`` (sizes and durations),
``omni_sdk.envelopes`` (the answer and error bodies of both APIs), ``omni_sdk.model_config``
(zero-code packages) and ``omni_sdk.sequences`` (a stateful model's sequence parameters).
Modules whose names start with ``_`` may change in any release.
"""

from __future__ import annotations

from omni_sdk._engine import Engine, EngineDefinitionError, LoadContext, Signature
from omni_sdk._plugins import EnginePlugins, PackageError
from omni_sdk._resources import Resources, Scaling
from omni_sdk._tensor_engine import ModelLoadError, Tensor, TensorEngine
from omni_sdk._tensors import InvalidInput, TensorSpec
from omni_sdk.hookspecs import hookimpl
from omni_sdk.model_config import ModelConfig

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineDefinitionError",
    "EnginePlugins",
    "InvalidInput",
    "LoadContext",
    "ModelConfig",
    "ModelLoadError",
    "PackageError",
    "Resources",
    "Scaling",
    "Signature",
    "Tensor",
    "TensorEngine",
    "TensorSpec",
    "__version__",
    "hookimpl",
]
