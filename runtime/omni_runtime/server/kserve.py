"""KServe v2 over HTTP, with Triton's extensions: health, metadata, configuration,
statistics, inference and the model repository.

``/infer`` is the hot path: its body goes to the model's worker untouched (decoding and
validation happen there, on the worker's core) and the worker's answer comes back as written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

from omni_runtime.scheduler import (
    ModelBusy,
    ModelDirectory,
    ModelHandle,
    ModelState,
    ModelUnavailable,
)
from omni_runtime.scheduler.trace import version_header
from omni_runtime.server.http import (
    JSON,
    HTTPError,
    Receive,
    Scope,
    Send,
    accepted_encoding,
    compress,
    error_body,
    read_body,
    respond,
    respond_json,
)
from omni_runtime.server.model_control import (
    ControlError,
    config_tensor,
    scaling_override,
    sequence_batching,
)
from omni_runtime.server.model_files import ModelFiles, has_files
from omni_runtime.server.shared_memory import SharedMemory, SharedMemoryError
from omni_runtime.server.shm_tensors import (
    REGION_MARK,
    request_from_regions,
    response_to_regions,
)
from omni_sdk import __version__
from omni_sdk.wire import V2_PREFIX, Kind

__all__ = [
    "KServeRoutes",
    "Reply",
    "binary_header_length",
    "model_reply",
    "names_version",
]


def names_version(handler: Any) -> Any:
    """Marks a model route whose answers carry ``Omni-Model-Version`` by themselves (the HTTP
    app then adds nothing to them): the hot routes, ``model_reply``'s callers."""
    handler.names_version = True
    return handler


COMPRESS_FROM = 1024  # bytes: a smaller answer is sent as it is, whatever the client accepts
EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "system_shared_memory",
]
Answer = tuple[int, int, bytes]  # a worker's answer: status, header length, body
Reply = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]  # status, body, type, headers


async def model_reply(
    model: ModelHandle,
    kind: int,
    parts: list[bytes],
    started: float,
    ai: bool,
    reject_if_busy: bool = False,
    encoding: str | None = None,
    after: Callable[[Answer], Answer] | None = None,
) -> Reply:
    """Send one request to the model: its answer (or why there is none) as an HTTP reply,
    compressed with ``encoding`` (gzip, deflate) when the client's Accept-Encoding asked and
    the answer is large enough for it to pay; ``after`` rewrites the model's answer first."""
    extra: list[tuple[bytes, bytes]] = []
    try:
        status, header_length, body = await model.call(kind, parts, reject_if_busy, started=started)
        if after is not None:
            status, header_length, body = after((status, header_length, body))
    except ModelBusy as exc:
        status, header_length, body = 429, 0, error_body(ai, 429, str(exc))
    except ModelUnavailable as exc:
        status, header_length, body = 503, 0, error_body(ai, 503, str(exc))
        extra = [(b"retry-after", str(exc.retry_after).encode())]
    extra += version_header(model.version_header)  # a hot route: it names its version here
    if encoding is not None and len(body) >= COMPRESS_FROM:
        body = compress(body, encoding)
        extra.append((b"content-encoding", encoding.encode()))
    if header_length:
        extra.append((b"inference-header-content-length", str(header_length).encode()))
        return status, body, b"application/octet-stream", extra
    return status, body, JSON, extra


def binary_header_length(headers: list[tuple[bytes, bytes]], model: ModelHandle) -> int:
    """An infer request's ``Inference-Header-Content-Length`` (0 without one: all JSON)."""
    for name, value in headers:
        if name == b"inference-header-content-length":
            try:
                return int(value)
            except ValueError:
                raise HTTPError(
                    400,
                    f"model '{model.name}': Inference-Header-Content-Length must be an integer",
                ) from None
    return 0


class KServeRoutes:
    """The v2 handlers; each takes ``(scope, receive, send, model)``."""

    def __init__(
        self,
        models: ModelDirectory,
        memory: SharedMemory | None = None,
        files: ModelFiles | None = None,
    ) -> None:
        self.models = models
        self.max_body = models.settings.max_body_size
        self.memory = memory or SharedMemory()
        self.files = files  # loads models from a load request's files

    # -- inference -----------------------------------------------------------------------

    @names_version
    async def infer(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        started = time.perf_counter()
        headers = scope["headers"]
        header_length = binary_header_length(headers, model)
        try:  # (read here, not through read(): the hot path saves a coroutine)
            body = await read_body(scope, receive, self.max_body, model.name)
        except HTTPError as exc:
            model.account(exc.status, started)
            raise
        await respond(send, *await self.infer_reply(model, headers, header_length, body, started))

    def infer_reply(
        self,
        model: ModelHandle,
        headers: list[tuple[bytes, bytes]],
        header_length: int,
        body: bytes,
        started: float,
    ) -> Coroutine[Any, Any, Reply]:
        """The reply to an infer request whose body has arrived (the HTTP connection's hot
        path asks for it directly: server/hot_path.py): ``await self.infer_reply(...)``.
        (Not itself a coroutine: the hot path's chain of them is one frame shorter.)"""
        if header_length < 0 or header_length > len(body):
            raise HTTPError(
                400,
                f"model '{model.name}': Inference-Header-Content-Length is {header_length} "
                f"but the body has {len(body)} bytes",
            )
        encoding = accepted_encoding(headers)
        if body.find(REGION_MARK, 0, header_length or len(body)) != -1:
            return self._infer_with_regions(model, body, header_length, started, encoding)
        parts = [V2_PREFIX.pack(header_length), body]
        return model_reply(model, Kind.INFER_V2, parts, started, False, False, encoding)

    async def _infer_with_regions(
        self,
        model: ModelHandle,
        body: bytes,
        header_length: int,
        started: float,
        encoding: str | None,
    ) -> Reply:
        """An infer request whose header names a shared-memory region: inputs read from
        their regions, the model called, outputs written into theirs (shm_tensors.py)."""
        try:
            body, header_length, plans = request_from_regions(self.memory, body, header_length)
        except SharedMemoryError as exc:
            model.account(exc.status, started)
            raise HTTPError(exc.status, f"model '{model.name}': {exc}") from None

        def after(answer: Answer) -> Answer:
            return response_to_regions(self.memory, model.name, plans, answer)

        parts = [V2_PREFIX.pack(header_length), body]
        return await model_reply(
            model, Kind.INFER_V2, parts, started, False, False, encoding, after
        )

    # -- health and metadata -------------------------------------------------------------

    async def live(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond(send, 200, b"")

    async def ready(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond(send, 200 if self.models.ready else 503, b"")

    async def server_metadata(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(
            send,
            {
                "name": "omni",
                "version": __version__,
                "extensions": EXTENSIONS,
                "isolation": self.models.isolation,
            },
        )

    async def model_metadata(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        spec = model.spec
        await respond_json(
            send,
            {
                "name": spec.name,
                "versions": [spec.version],
                "platform": "omni",
                "inputs": [_tensor(t) for t in spec.inputs],
                "outputs": [_tensor(t) for t in spec.outputs],
            },
        )

    async def model_ready(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        await respond(send, 200 if model.state is ModelState.READY else 400, b"")

    async def model_config(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        spec = model.spec
        batching = sequence_batching(spec)
        await respond_json(
            send,
            {
                "name": spec.name,
                "platform": "omni",
                "backend": "omni",
                "max_batch_size": spec.max_batch_size,
                **({"sequence_batching": batching} if batching is not None else {}),
                "input": [config_tensor(t, spec.batch_dimension) for t in spec.inputs],
                "output": [config_tensor(t, spec.batch_dimension) for t in spec.outputs],
                "model_transaction_policy": {"decoupled": spec.streaming},
                "parameters": {
                    "task": {"string_value": spec.task},
                    "package": {"string_value": spec.package},
                },
                "instance_group": [
                    {
                        "count": spec.scaling.max_replicas,
                        "kind": "KIND_GPU" if spec.device.startswith("cuda") else "KIND_CPU",
                    }
                ],
                "omni": {
                    "resources": spec.resources.model_dump(),
                    "scaling": spec.scaling.model_dump(),
                },
            },
        )

    async def model_stats(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        await respond_json(send, {"model_stats": [_stats(model)]})

    async def all_stats(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await respond_json(send, {"model_stats": [_stats(m) for m in self.models]})

    # -- repository extension ------------------------------------------------------------

    async def repository_index(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        body = await read_body(scope, receive, self.max_body)
        try:
            request = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise HTTPError(400, f"repository index: the body is not valid JSON: {exc}") from None
        only_ready = isinstance(request, dict) and bool(request.get("ready"))
        index: list[dict[str, Any]] = []
        for model in self.models:
            if only_ready and model.state is not ModelState.READY:
                continue
            index.append(
                {
                    "name": model.name,
                    "version": model.spec.version,
                    "state": model.state.value,
                    "reason": model.reason,
                    "replicas": model.ready_replicas,
                }
            )
        if not only_ready:
            for failure in self.models.failures:
                index.append(
                    {
                        "name": failure.package_dir.name,
                        "version": "",
                        "state": "UNAVAILABLE",
                        "reason": failure.error,
                    }
                )
        await respond_json(send, index)

    async def repository_load(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        body = await read_body(scope, receive, self.max_body)
        if await self._load_files(send, model.name, body):
            return
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ControlError("the body must be a JSON object")
            update = scaling_override(model.spec, request.get("parameters"))
        except (ControlError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise HTTPError(400, f"failed to load '{model.name}': {exc}") from None
        if update:
            self.models.configure(model, update)
        error = await self.models.load(model)
        if error and model.stopping:
            raise HTTPError(503, error, [(b"retry-after", b"5")])
        if error:
            raise HTTPError(400, f"failed to load model '{model.name}': {error}")
        await respond(send, 200, b"")

    def load_unknown(self, name: str, refusal: str) -> Any:
        """The handler of a load request for a model not served here: served from the
        request's files, if it carries some; else ``refusal``."""

        async def load(scope: Scope, receive: Receive, send: Send, _: Any) -> None:
            body = await read_body(scope, receive, self.max_body)
            if not await self._load_files(send, name, body):
                raise HTTPError(400, refusal)

        return load

    async def _load_files(self, send: Send, name: str, body: bytes) -> bool:
        """Answer a load request that carries model files (True), else nothing (False)."""
        if b'"file:' not in body:
            return False
        try:
            parameters = json.loads(body).get("parameters")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
            return False  # the ordinary path says what is wrong with it
        if not has_files(parameters):
            return False
        if self.files is None:
            raise HTTPError(400, f"failed to load '{name}': this node loads no model files")
        try:
            error = await self.files.load(name, parameters)
        except ControlError as exc:
            raise HTTPError(400, f"failed to load '{name}': {exc}") from None
        if error:
            raise HTTPError(400, f"failed to load model '{name}': {error}")
        await respond(send, 200, b"")
        return True

    async def repository_unload(
        self, scope: Scope, receive: Receive, send: Send, model: ModelHandle
    ) -> None:
        await self.models.unload(model)
        await respond(send, 200, b"")


def _tensor(t: dict[str, Any]) -> dict[str, Any]:
    return {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]}


def _stats(model: ModelHandle) -> dict[str, Any]:
    return model.stats.to_json(model.name, model.spec.version)
