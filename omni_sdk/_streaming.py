"""Streaming engines: ``infer`` as a generator (or async generator) of output chunks.

A streamed request (``/ai/run`` with ``"stream": true``) gets each chunk as it is produced; any
other request gets the chunks joined into one output: string fields concatenated, list fields
extended, every other field from the last chunk (DESIGN.md).
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic_core
from pydantic import BaseModel, ValidationError

__all__ = ["ajoin", "chunk_type", "encode_chunk", "is_streaming", "join_chunks", "sync_join"]

_STREAM_ORIGINS = {
    collections.abc.Iterator,
    collections.abc.Iterable,
    collections.abc.Generator,
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
}


def chunk_type(annotation: Any) -> Any | None:
    """The chunk type of ``Iterator[Resp]``-like return annotations; None for anything else."""
    if typing.get_origin(annotation) in _STREAM_ORIGINS and typing.get_args(annotation):
        return typing.get_args(annotation)[0]
    return None


def is_streaming(function: Any) -> bool:
    """Whether ``infer`` yields chunks (a generator or an async generator function)."""
    return inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function)


def join_chunks(model: type[BaseModel], chunks: list[Any]) -> BaseModel:
    """One output of ``model`` from its chunks (instances or dicts)."""
    if not chunks:
        raise ValueError("the engine yielded no chunk")
    dumped = []
    for chunk in chunks:
        if isinstance(chunk, BaseModel):
            dumped.append(chunk.model_dump())
        elif isinstance(chunk, dict):
            dumped.append(chunk)
        else:
            raise TypeError(f"expected {model.__name__} chunks, got {type(chunk).__name__}")
    joined = dict(dumped[-1])
    for field, value in dumped[-1].items():
        values = [d.get(field) for d in dumped if field in d]
        if isinstance(value, str) and all(isinstance(v, str) for v in values):
            joined[field] = "".join(str(v) for v in values)
        elif isinstance(value, list) and all(isinstance(v, list) for v in values):
            joined[field] = [item for v in values for item in (v or [])]
    try:
        return model.model_validate(joined)
    except ValidationError as exc:
        raise ValueError(f"the joined chunks are not a valid {model.__name__}: {exc}") from None


def encode_chunk(model: type[BaseModel], chunk: Any) -> bytes:
    """One chunk as JSON, checked against the output model (a dict is validated)."""
    if isinstance(chunk, dict):
        chunk = model.model_validate(chunk)
    if not isinstance(chunk, model):
        raise TypeError(f"expected {model.__name__} chunks, got {type(chunk).__name__}")
    # NaN and ±inf as strings, as in every other answer (protobuf's JSON mapping).
    return bytes(pydantic_core.to_json(chunk.model_dump(mode="python"), inf_nan_mode="strings"))


def sync_join(model: type[BaseModel], chunks: Iterator[Any]) -> BaseModel:
    return join_chunks(model, list(chunks))


async def ajoin(model: type[BaseModel], chunks: AsyncIterator[Any]) -> BaseModel:
    return join_chunks(model, [chunk async for chunk in chunks])
