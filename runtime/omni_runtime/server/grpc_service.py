"""KServe v2 over gRPC: ``inference.GRPCInferenceService``, as ``tritonclient.grpc`` speaks it.

The service definitions are the ones tritonclient ships (``tritonclient.grpc.service_pb2``),
served with grpcio's asyncio server on the runtime's event loop. An infer request is turned into
the v2 binary-extension body the HTTP route would have received (a JSON header, then the raw
tensors) and goes through the same scheduler queue to the same worker; the worker's answer is
turned back into ``raw_output_contents``. Errors are the HTTP route's, mapped to status codes:
an unknown model is NOT_FOUND and names it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from omni_runtime.scheduler import (
    ModelBusy,
    ModelDirectory,
    ModelHandle,
    ModelState,
    ModelUnavailable,
)
from omni_runtime.scheduler.trace import TRACE, Trace
from omni_runtime.server import grpc_shared_memory as shm
from omni_runtime.server import grpc_stream
from omni_runtime.server.grpc_files import load_files, names_files
from omni_runtime.server.grpc_stats import statistics_response
from omni_runtime.server.grpc_tensors import RequestError, config_tensor, infer_response
from omni_runtime.server.model_control import ControlError, scaling_override
from omni_runtime.server.model_files import ModelFiles
from omni_sdk import __version__
from omni_sdk.wire import V2_PREFIX, Kind

__all__ = ["InferenceService"]

log = logging.getLogger("omni.grpc")

TRITON_UNKNOWN = "Request for unknown model"  # as Triton says it; its clients match it

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _tensor_metadata(t: dict[str, Any]) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=t["name"], datatype=t["datatype"], shape=t["shape"]
    )


class InferenceService(shm.SharedMemoryRPCs, service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The v2 gRPC service over the node's models."""

    def __init__(
        self,
        models: ModelDirectory,
        authorize: Callable[[Any, bool], str | None],
        node: str | None = None,
    ) -> None:
        self.models = models
        self.node = node  # in a fleet: answers name the node that served them
        self.max_body = models.settings.max_body_size
        self.authorize = authorize  # (context, admin) -> an error message, or None
        self.files: ModelFiles | None = None  # loads models from a load request's files

    async def _guard(self, context: Any, admin: bool = False) -> None:
        error = self.authorize(context, admin)
        if error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, error)

    async def _model(self, context: Any, name: str, version: str = "") -> ModelHandle:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(self.models.names()) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{TRITON_UNKNOWN}: '{name}' is not found (served models: {known})",
            )
        if model is not None:
            try:
                self._check_version(model, version)
            except _Refused as refused:
                await context.abort(refused.code, str(refused))
        return model  # type: ignore[return-value]

    @staticmethod
    def _check_version(model: ModelHandle, version: str) -> None:
        if version not in ("", "1", model.spec.version):
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                f"{TRITON_UNKNOWN}: '{model.name}' version {version!r} is not found; it serves "
                f"version {model.spec.version!r} (also reached as '1')",
            )

    # -- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.models.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        model = await self._model(context, request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=model.state is ModelState.READY)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        return service_pb2.ServerMetadataResponse(
            name="omni",
            version=__version__,
            extensions=shm.EXTENSIONS,
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        spec = (await self._model(context, request.name, request.version)).spec
        return service_pb2.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform="omni",
            inputs=[_tensor_metadata(t) for t in spec.inputs],
            outputs=[_tensor_metadata(t) for t in spec.outputs],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        spec = (await self._model(context, request.name, request.version)).spec
        config = model_config_pb2.ModelConfig(
            name=spec.name,
            platform="omni",
            backend="omni",
            max_batch_size=spec.max_batch_size,
            input=[config_tensor(t, model_config_pb2.ModelInput, spec) for t in spec.inputs],
            output=[config_tensor(t, model_config_pb2.ModelOutput, spec) for t in spec.outputs],
        )
        return service_pb2.ModelConfigResponse(config=grpc_stream.call_policy(config, spec))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        if request.name:
            models = [await self._model(context, request.name, request.version)]
        else:
            models = list(self.models)
        return statistics_response(models)

    # -- inference -----------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._guard(context)
        model = await self._model(context, request.model_name, request.model_version)
        if model.spec.streaming:  # a decoupled model, as Triton refuses it
            await grpc_stream.refuse(context, model.name)
        try:
            response, metadata = await self._infer(model, request)
        except _Refused as refused:
            if refused.metadata:
                context.set_trailing_metadata(refused.metadata)
            await context.abort(refused.code, str(refused))
        context.set_trailing_metadata(metadata)
        return response

    async def ModelStreamInfer(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        """Each request of the stream answered as ``ModelInfer`` would answer it (a decoupled
        model's with a response per chunk: ``grpc_stream``), as soon as it is ready, several at
        once (``id`` tells them apart); an error is that request's ``error_message``."""
        await self._guard(context)
        answers: asyncio.Queue[Any] = asyncio.Queue(64)  # a slow reader holds the workers back
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                model = self.models.get(request.model_name)
                if model is None:
                    known = ", ".join(self.models.names()) or "none"
                    raise _Refused(
                        grpc.StatusCode.NOT_FOUND,
                        f"{TRITON_UNKNOWN}: '{request.model_name}' is not found "
                        f"(served models: {known})",
                    )
                self._check_version(model, request.model_version)
                if model.spec.streaming:  # a decoupled model: a response per chunk
                    return await grpc_stream.answer(model, request, self.max_body, answers.put)
                response, _ = await self._infer(model, request)
                if grpc_stream.wants_final_flag(request):
                    response.parameters["triton_final_response"].bool_param = True
                await answers.put(service_pb2.ModelStreamInferResponse(infer_response=response))
            except _Refused as refused:
                await answers.put(service_pb2.ModelStreamInferResponse(error_message=str(refused)))

        async def read() -> None:
            async for request in requests:
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)

        reader = asyncio.ensure_future(read())
        try:
            while not (reader.done() and not pending and answers.empty()):
                getter = asyncio.ensure_future(answers.get())
                await asyncio.wait({getter, reader, *pending}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            reader.result()  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            for task in pending:
                task.cancel()

    async def _infer(self, model: ModelHandle, request: Any) -> tuple[Any, list[tuple[str, str]]]:
        """One infer request: the response and its trailing metadata; ``_Refused`` else."""
        started = time.perf_counter()
        try:
            body, header_length, after = shm.request_body(self.shared_memory, request, model.name)
        except (RequestError, ValueError, OverflowError, TypeError) as exc:
            model.account(400, started)
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"model '{model.name}': {exc}"
            ) from None
        if len(body) > self.max_body:
            model.account(413, started)
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model '{model.name}': the request is larger than the server's limit of "
                f"{self.max_body} bytes (server.max_body_size in omni.toml)",
            )
        trace = None
        if self.node is not None:
            trace = Trace()
            TRACE.set(trace)
        try:
            status, out_length, answer = await model.call(
                Kind.INFER_V2, [V2_PREFIX.pack(header_length), body], started=started
            )
        except ModelBusy as exc:
            status, out_length, answer = 429, 0, json.dumps({"error": str(exc)}).encode()
        except ModelUnavailable as exc:
            status, out_length, answer = 503, 0, json.dumps({"error": str(exc)}).encode()
        if after is not None:  # outputs meant for shared-memory regions
            status, out_length, answer = after((status, out_length, answer))
        trace = TRACE.get()  # another version's, when a rollout replaced the chosen one
        version = (trace.version if trace is not None else None) or model.spec.version
        metadata = [("omni-model-version", version)]
        if trace is not None and self.node is not None:  # in a fleet: who answered, how
            metadata.append(("omni-node", trace.served_by or self.node))
            if trace.route:
                metadata.append(("omni-route", trace.route))
        if status != 200:
            try:
                message = str(json.loads(answer)["error"])
            except (ValueError, KeyError, TypeError):
                message = answer.decode(errors="replace")
            raise _Refused(_STATUS.get(status, grpc.StatusCode.INTERNAL), message, metadata)
        return infer_response(model.name, request.id, answer, out_length, version), metadata

    # -- repository extension ------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        await self._guard(context, admin=True)
        response = service_pb2.RepositoryIndexResponse()
        for model in self.models:
            if request.ready and model.state is not ModelState.READY:
                continue
            response.models.add(
                name=model.name,
                version=model.spec.version,
                state=model.state.value,
                reason=model.reason,
            )
        return response

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await self._guard(context, admin=True)
        model = self.models.get(request.model_name)
        if names_files(request):
            return await load_files(self.files, request, context)
        if model is None:
            known = ", ".join(self.models.names()) or "none"
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"failed to load '{request.model_name}': no such model (served models: {known})",
            )
        assert model is not None  # (abort raised otherwise)
        parameters = {
            key: value.string_param or value.bytes_param
            for key, value in request.parameters.items()
        }
        try:
            update = scaling_override(model.spec, parameters or None)
        except ControlError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model.name}': {exc}"
            )
        if update:
            self.models.configure(model, update)
        error = await self.models.load(model)
        if error:
            code = grpc.StatusCode.UNAVAILABLE if model.stopping else grpc.StatusCode.INTERNAL
            await context.abort(code, f"failed to load model '{model.name}': {error}")
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._guard(context, admin=True)
        model = await self._model(context, request.model_name)
        await self.models.unload(model)
        return service_pb2.RepositoryModelUnloadResponse()


class _Refused(Exception):
    """A request answered with a gRPC error: its status code and message."""

    def __init__(
        self, code: Any, message: str, metadata: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.metadata = metadata or []
