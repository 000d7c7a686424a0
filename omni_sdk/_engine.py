"""The ``Engine`` base class that model authors subclass."""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from omni_sdk._resources import Resources, Scaling
from omni_sdk._streaming import chunk_type, is_streaming
from omni_sdk._tensors import TensorSpec, specs_of

__all__ = ["Engine", "EngineDefinitionError", "LoadContext", "Signature"]

MAX_WARMUP_BYTES = 1 << 20  # an engine's warm-up request, as JSON


class EngineDefinitionError(TypeError):
    """An ``Engine`` subclass is declared in a way Omni cannot serve; the message says how."""


@dataclass(frozen=True)
class LoadContext:
    """What ``Engine.load`` gets: where to run, where the package lives, what it may use."""

    model_name: str
    device: str = "cpu"
    model_dir: Path = field(default_factory=Path.cwd)
    resources: Resources = field(default_factory=Resources)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("omni.engine"))


@dataclass(frozen=True)
class Signature:
    """An engine's inputs and outputs: pydantic models and the v2 tensors they map to."""

    request_model: type[BaseModel]
    response_model: type[BaseModel]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Engine:
    """Base class of every model served by Omni.

    Set ``name`` (the served model name, e.g. ``"@cf/acme/sentiment"``) and ``task`` (a
    Workers AI task name), then implement ``load`` and ``infer``. ``infer`` takes one
    instance of a pydantic model and returns another; their annotations define the model's
    JSON schema and its KServe v2 tensors. It may be ``async def``, or a generator (or async
    generator) of output chunks, annotated ``-> Iterator[Resp]`` (``AsyncIterator[Resp]``):
    ``/ai/run`` with ``"stream": true`` sends each chunk as it comes (server-sent events),
    everything else gets the chunks joined.

    Batching is opt-in: set ``max_batch_size`` above 1 and implement ``infer_batch``, which
    receives up to that many requests at once (waiting at most ``batch_timeout`` seconds for
    a batch to fill) and returns one response per request, in order.

    ``warmup`` is an example request, as the ``/ai/run`` body would hold it (e.g.
    ``{"text": "hello"}``): when set, each new replica answers it before it takes traffic (a
    new version being rolled out that fails it gets none). It is checked against the input
    model when the package is discovered.

    ``resources`` and ``scaling`` are defaults; an ``omni.toml`` beside the package or at
    the repository root overrides them per deployment.
    """

    name: ClassVar[str]
    task: ClassVar[str] = ""
    description: ClassVar[str] = ""
    resources: ClassVar[Resources] = Resources()
    scaling: ClassVar[Scaling] = Scaling()
    max_batch_size: ClassVar[int] = 0
    batch_timeout: ClassVar[float] = 0.0
    warmup: ClassVar[dict[str, Any] | None] = None

    def load(self, ctx: LoadContext) -> None:
        """Load weights and warm up. Runs once per replica, in the worker process."""

    def infer(self, request: Any) -> Any:
        """Answer one request."""
        raise NotImplementedError(f"{type(self).__name__} implements neither infer nor infer_batch")

    def infer_batch(self, requests: list[Any]) -> list[Any] | Awaitable[list[Any]]:
        """Answer several requests at once; by default, one ``infer`` call each."""
        raise NotImplementedError

    def unload(self) -> None:
        """Release what ``load`` took. Runs when the replica stops."""

    @classmethod
    def signature(cls) -> Signature:
        """Inputs and outputs, read from the annotations of ``infer`` (or ``infer_batch``)."""
        batched = cls.infer_batch is not Engine.infer_batch and cls.infer is Engine.infer
        method = cls.infer_batch if batched else cls.infer
        where = f"{cls.__module__}.{cls.__qualname__}.{method.__name__}"
        try:
            hints = typing.get_type_hints(method)
        except Exception as exc:
            raise EngineDefinitionError(f"{where}: cannot read its annotations: {exc}") from exc
        params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
        if not params or params[0].name not in hints or "return" not in hints:
            raise EngineDefinitionError(
                f"{where} must annotate its request parameter and its return type with "
                "pydantic models, e.g. `def infer(self, request: Req) -> Resp`"
            )
        request_type, response_type = hints[params[0].name], hints["return"]
        streamed = chunk_type(response_type)
        if streamed is not None and not batched:  # a generator of output chunks
            response_type = streamed
        if batched:
            request_type = _list_item(request_type)
            response_type = _list_item(response_type)
        for role, model in (("request", request_type), ("return", response_type)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise EngineDefinitionError(
                    f"{where}: the {role} type must be a pydantic BaseModel subclass, got {model!r}"
                )
        return Signature(
            request_model=request_type,
            response_model=response_type,
            inputs=specs_of(request_type),
            outputs=specs_of(response_type),
        )

    @classmethod
    def is_streaming(cls) -> bool:
        """Whether ``infer`` yields output chunks (a generator or async generator)."""
        return cls.max_batch_size <= 1 and is_streaming(cls.infer)

    @classmethod
    def validate_definition(cls) -> None:
        """Raise ``EngineDefinitionError`` unless this class can be served."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise EngineDefinitionError(f"{where} must set `name`, e.g. name = '@cf/acme/model'")
        if any(c.isspace() for c in name) or "?" in name or "#" in name:
            raise EngineDefinitionError(
                f"{where}: name {name!r} may not contain spaces, '?' or '#'"
            )
        if cls.max_batch_size > 1 and cls.infer_batch is Engine.infer_batch:
            raise EngineDefinitionError(
                f"{where} sets max_batch_size={cls.max_batch_size} but does not implement "
                "infer_batch(self, requests: list[Req]) -> list[Resp]"
            )
        if cls.infer is Engine.infer and cls.infer_batch is Engine.infer_batch:
            raise EngineDefinitionError(f"{where} must implement infer (or infer_batch)")
        if not isinstance(cls.resources, Resources) or not isinstance(cls.scaling, Scaling):
            raise EngineDefinitionError(
                f"{where}: `resources` and `scaling` must be omni_sdk.Resources and "
                "omni_sdk.Scaling instances"
            )
        signature = cls.signature()
        if cls.warmup is not None:
            _check_warmup(where, cls.warmup, signature.request_model)


def _check_warmup(where: str, warmup: Any, request_model: type[BaseModel]) -> None:
    """``warmup`` is a JSON object the engine's input model accepts."""
    if not isinstance(warmup, dict):
        raise EngineDefinitionError(
            f"{where}: `warmup` must be a dict holding an example request (the /ai/run body), "
            f"got {type(warmup).__name__}"
        )
    try:
        encoded = json.dumps(warmup)
    except (TypeError, ValueError) as exc:
        raise EngineDefinitionError(f"{where}: `warmup` is not JSON: {exc}") from None
    if len(encoded) > MAX_WARMUP_BYTES:
        raise EngineDefinitionError(
            f"{where}: `warmup` is {len(encoded)} bytes as JSON, over the limit of "
            f"{MAX_WARMUP_BYTES}"
        )
    try:
        request_model.model_validate(warmup)
    except ValidationError as exc:
        problems = "; ".join(
            f"input '{'.'.join(str(x) for x in e['loc']) or '(root)'}': {e['msg']}"
            for e in exc.errors(include_url=False)[:3]
        )
        raise EngineDefinitionError(
            f"{where}: `warmup` is not a valid request: {problems}"
        ) from None


def _list_item(annotation: Any) -> Any:
    if typing.get_origin(annotation) is list and typing.get_args(annotation):
        return typing.get_args(annotation)[0]
    return annotation
