"""Streaming engines as Triton's decoupled models over gRPC ``ModelStreamInfer``.

A request to a streaming engine (``infer`` yields chunks) is sent to its worker as
``Kind.STREAM_V2``: the worker answers each chunk as a v2 inference response (a CHUNK frame),
which becomes one ``ModelStreamInferResponse`` as soon as it arrives; when the engine is done,
a client that set ``triton_enable_empty_final_response`` gets an empty response marked
``triton_final_response = true``, as Triton sends it. Its other responses carry
``triton_final_response = false``. ``ModelInfer`` (one answer per request) refuses a decoupled
model, as Triton does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from omni_runtime.discovery import ModelSpec
from omni_runtime.scheduler import ModelBusy, ModelHandle, ModelUnavailable
from omni_runtime.server.grpc_tensors import RequestError, infer_body, infer_response
from omni_runtime.server.model_control import sequence_batching
from omni_runtime.workers.channel import ChunkSink
from omni_sdk.wire import V2_PREFIX, Kind

__all__ = ["answer", "call_policy", "refuse", "wants_final_flag"]

Put = Callable[[Any], Awaitable[None]]


def wants_final_flag(request: Any) -> bool:
    """The client asked for ``triton_final_response`` on the last response of a request."""
    parameter = request.parameters.get("triton_enable_empty_final_response")
    return parameter is not None and parameter.bool_param


def call_policy(config: Any, spec: ModelSpec) -> Any:
    """A ``ModelConfig`` with how the model is called: decoupled (a streaming engine), and
    ``sequence_batching`` (a sequence model), as ``/v2/models/{name}/config`` shows them."""
    config.model_transaction_policy.decoupled = spec.streaming
    batching = sequence_batching(spec)
    if batching is not None:
        json_format.ParseDict(batching, config.sequence_batching)
    return config


async def refuse(context: Any, model: str) -> None:
    """``ModelInfer`` does not answer a decoupled model: UNIMPLEMENTED, in Triton's words."""
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "ModelInfer RPC doesn't support models with decoupled transaction policy: model "
        f"'{model}' streams its answer; call ModelStreamInfer (tritonclient's start_stream and "
        "async_stream_infer) for one response per chunk, or the HTTP route for one joined answer",
    )


async def answer(model: ModelHandle, request: Any, max_body: int, put: Put) -> None:
    """Answer one request of a stream to a decoupled model through ``put``: a response per
    chunk, then the empty final one if asked; an error is a response with ``error_message``."""
    started = time.perf_counter()
    try:
        body, header_length = infer_body(request)
    except (RequestError, ValueError, OverflowError, TypeError) as exc:
        model.account(400, started)
        await put(_error(f"model '{model.name}': {exc}"))
        return
    if len(body) > max_body:
        model.account(413, started)
        await put(
            _error(
                f"model '{model.name}': the request is larger than the server's limit of "
                f"{max_body} bytes (server.max_body_size in omni.toml)"
            )
        )
        return
    final = wants_final_flag(request)
    version = model.spec.version
    chunks = ChunkSink()
    call = asyncio.ensure_future(
        model.call(
            Kind.STREAM_V2,
            [V2_PREFIX.pack(header_length), body],
            on_chunk=chunks,
            started=started,
        )
    )
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
            ready = [getter.result()] if getter.done() else []
            getter.cancel()
            while not chunks.empty():
                ready.append(chunks.take())
            for chunk in ready:
                (length,) = V2_PREFIX.unpack_from(chunk)
                response = infer_response(
                    model.name, request.id, chunk[V2_PREFIX.size :], length, version
                )
                if final:
                    response.parameters["triton_final_response"].bool_param = False
                await put(service_pb2.ModelStreamInferResponse(infer_response=response))
            if call.done():
                break
        status, _, answer = call.result()
    except (ModelBusy, ModelUnavailable) as exc:
        await put(_error(str(exc)))
        return
    finally:
        if not call.done():
            call.cancel()
    if status != 200:
        await put(_error(_message(answer)))
        return
    if final:
        response = service_pb2.ModelInferResponse(
            model_name=model.name, model_version=version, id=request.id
        )
        response.parameters["triton_final_response"].bool_param = True
        await put(service_pb2.ModelStreamInferResponse(infer_response=response))


def _error(message: str) -> Any:
    return service_pb2.ModelStreamInferResponse(error_message=message)


def _message(answer: bytes) -> str:
    try:
        return str(json.loads(answer)["error"])
    except (ValueError, KeyError, TypeError):
        return answer.decode(errors="replace")
