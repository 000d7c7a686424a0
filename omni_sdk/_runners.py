"""Which runner serves an engine: the pydantic codecs, or the numpy ones of a TensorEngine.

It lives apart from both runners so that imports go one way:
``_runners`` → ``_tensor_serving`` → ``_serving`` → ``envelopes``. ``_tensor_serving`` (and
numpy) is imported only for a ``TensorEngine``: a plain engine's worker never loads numpy.
"""

from __future__ import annotations

from omni_sdk._engine import Engine
from omni_sdk._serving import EngineRunner
from omni_sdk._tensor_engine import TensorEngine
from omni_sdk._tensors import DEFAULT_MAX_TENSOR_ELEMENTS

__all__ = ["runner_for"]


def runner_for(
    engine: Engine,
    model_name: str | None = None,
    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
) -> EngineRunner:
    """The runner that serves ``engine``: tensor-native engines get the numpy codecs.

    ``max_tensor_elements``: a v2 input declaring more elements gets a 400
    (``server.max_tensor_elements``).
    """
    if isinstance(engine, TensorEngine):
        from omni_sdk._tensor_serving import TensorEngineRunner

        return TensorEngineRunner(engine, model_name, max_tensor_elements)
    return EngineRunner(engine, model_name, max_tensor_elements)
