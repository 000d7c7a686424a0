"""A tensor model served by the "remote" runtime that TritonEngine forwards to."""

from __future__ import annotations

from typing import Any

import numpy as np

from omni_sdk import Tensor, TensorEngine, hookimpl


class Scale(TensorEngine):
    name = "@remote/scale"
    inputs = (Tensor("x", "FP32", (-1, -1)),)
    outputs = (Tensor("y", "FP32", (-1, -1)),)

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 3}


@hookimpl
def register_engines(register: Any) -> None:
    register(Scale)
