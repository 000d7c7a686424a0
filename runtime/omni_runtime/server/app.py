"""The HTTP surface: KServe v2 (with Triton's extensions), ``/ai/run``, metrics, OpenAPI.

A plain ASGI application rather than a framework: the infer routes are the hot path, and all
they do here is check the request (its bearer token, once, against precomputed header values),
hand its body to the model's worker untouched, and send back what the worker wrote. Decoding
and validation happen in the worker, on its own core; only while a model has no replica ready
does an ``/ai/run`` body get checked here first (``input_check.py``), so that a body the model
would refuse does not start it. Header size and body time limits live in ``connection.py``,
below ASGI.
"""

from __future__ import annotations

import json
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from omni_runtime.batch import api as batch_api
from omni_runtime.batch.runner import BatchRunner
from omni_runtime.scheduler import (
    Controller,
    ModelBusy,
    ModelState,
    ModelUnavailable,
    ServedModel,
)
from omni_runtime.server import sse
from omni_runtime.server.input_check import InputCheck
from omni_runtime.server.openai_api import OpenAIRoutes, openai_error
from omni_runtime.server.openapi import build_openapi
from omni_runtime.server.tokens import Access, Tokens, authorized
from omni_sdk import __version__
from omni_sdk.envelopes import ai_error_body, v2_error_body
from omni_sdk.wire import V2_PREFIX, Kind

__all__ = ["OmniApp"]

log = logging.getLogger("omni.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
_VERSIONED = re.compile(r"^(.*)/versions/([^/]+)$")
_MODEL_SUFFIXES = ("/infer", "/ready", "/config", "/stats", "")
_ROUTE_CACHE_LIMIT = 4096
_BEARER = [(b"www-authenticate", b"Bearer")]

Route = tuple[Any, "ServedModel | None", tuple[bytes, ...]]  # handler, model, accepted tokens


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class BodyTooLarge(HTTPError):
    pass


class ClientGone(Exception):
    """The client disconnected before its request body arrived whole."""


class OmniApp:
    """ASGI application over the ``Controller`` of every served model."""

    def __init__(
        self,
        node: Controller,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        tokens: Tokens | None = None,
        batches: BatchRunner | None = None,
    ) -> None:
        self.node = node
        self.batches = batches
        self.models = node.models
        self.metrics = node.metrics
        self.max_body = node.settings.max_body_size
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self.tokens = tokens or Tokens()
        self._accepted = {access: self.tokens.accepted(access) for access in Access}
        self._routes: dict[tuple[str, str], Route] = {}
        self._openapi: bytes | None = None
        # Made on a model's first request while it has no replica ready; one per version.
        self._input_checks: weakref.WeakKeyDictionary[ServedModel, InputCheck | None] = (
            weakref.WeakKeyDictionary()
        )
        self.openai = OpenAIRoutes(node, _respond, self._observe)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._on_startup:
                        await self._on_startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown:
                    await self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _observe(self, model: ServedModel, status: int, elapsed: float) -> None:
        model.stats.record(status == 200, int(elapsed * 1e9))
        self.metrics.observe(model.name, status, elapsed)

    # -- routing -------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        route = self._routes.get((method, path))
        if route is None:
            route = self._resolve(method, path)
        handler, model, accepted = route
        if accepted and not authorized(scope["headers"], accepted):
            await self._unauthorized(scope, send)
            return
        try:
            await handler(scope, receive, send, model)
        except HTTPError as exc:
            await _respond(
                send, exc.status, _family_error(path, exc.status, str(exc)), extra=exc.headers
            )
        except ClientGone:
            pass  # nobody is left to answer
        except Exception:  # a bug here must cost one request, never the server
            log.exception("%s %s failed", method, path)
            message = f"internal error handling {method} {path}; see the runtime's log"
            await _respond(send, 500, _family_error(path, 500, message))

    async def _unauthorized(self, scope: Scope, send: Send) -> None:
        path: str = scope["path"]
        sent = any(name == b"authorization" for name, _ in scope["headers"])
        admin = path.startswith("/v2/repository") and self.tokens.admin
        variable = "OMNI_ADMIN_TOKEN" if admin else "OMNI_API_TOKEN"
        if sent:
            message = f"the bearer token is not valid for {path} (it needs the server's {variable})"
        else:
            message = (
                f"{path} needs a bearer token: send 'Authorization: Bearer TOKEN' with the "
                f"server's {variable}"
            )
        await _respond(send, 401, _family_error(path, 401, message), extra=_BEARER)

    def _resolve(self, method: str, path: str) -> Route:
        handler, model = self._handler(method, path)
        if path.startswith(("/v2/repository", "/ai/batch")):
            access = Access.ADMIN
        elif getattr(handler, "__name__", "") in _OPEN_HANDLERS:
            access = Access.OPEN
        else:
            access = Access.API
        route = (handler, model, self._accepted[access])
        if model is not None and len(self._routes) < _ROUTE_CACHE_LIMIT:
            self._routes[(method, path)] = route
        return route

    def _handler(self, method: str, path: str) -> tuple[Any, ServedModel | None]:
        route: tuple[Any, ServedModel | None] | None = None
        fixed = _FIXED_ROUTES.get((method, path))
        if fixed is not None:
            route = (getattr(self, fixed), None)
        elif path.startswith("/v2/models/"):
            route = self._resolve_model(method, path[len("/v2/models/") :])
        elif path.startswith("/ai/run/"):
            model = self.models.get(path[len("/ai/run/") :])
            if model is None:
                route = (self.unknown_model, None)
            else:
                route = (
                    (self.ai_run, model) if method == "POST" else (self.method_not_allowed, None)
                )
        elif path.startswith("/v1/"):
            openai = self.openai.handler(method, path)
            route = (openai, None) if openai is not None else (self.not_found, None)
        elif path.startswith("/v2/repository/models/") and method == "POST":
            rest = path[len("/v2/repository/models/") :]
            for action in ("load", "unload"):
                model = self.models.get(rest.removesuffix("/" + action))
                if rest.endswith("/" + action) and model:
                    route = (getattr(self, f"repository_{action}"), model)
            route = route or (self.unknown_model, None)
        return route or (self.not_found, None)

    def _resolve_model(self, method: str, rest: str) -> tuple[Any, ServedModel | None]:
        for suffix in _MODEL_SUFFIXES:
            if suffix and not rest.endswith(suffix):
                continue
            name = rest[: len(rest) - len(suffix)]
            versioned = _VERSIONED.match(name)
            version = None
            if versioned and versioned.group(1) in self.models:
                name, version = versioned.group(1), versioned.group(2)
            model = self.models.get(name)
            if model is None:
                continue
            if version is not None and version != "1":
                return (self._no_such_version(version), None)
            handler = _MODEL_ROUTES.get((method, suffix))
            return (getattr(self, handler), model) if handler else (self.method_not_allowed, None)
        return (self.unknown_model, None)

    # -- inference -----------------------------------------------------------------------

    async def v2_infer(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        started = time.perf_counter()
        header_length = 0
        for name, value in scope["headers"]:
            if name == b"inference-header-content-length":
                try:
                    header_length = int(value)
                except ValueError:
                    raise HTTPError(
                        400, "Inference-Header-Content-Length must be an integer"
                    ) from None
        body = await self._read_body(scope, receive, model)
        if header_length < 0 or header_length > len(body):
            raise HTTPError(
                400,
                f"model '{model.name}': Inference-Header-Content-Length is {header_length} "
                f"but the body has {len(body)} bytes",
            )
        await self._forward(
            send, model, Kind.INFER_V2, [V2_PREFIX.pack(header_length), body], started, False
        )

    async def ai_run(self, scope: Scope, receive: Receive, send: Send, model: ServedModel) -> None:
        started = time.perf_counter()
        body = await self._read_body(scope, receive, model)
        if self.batches is not None:
            answer = None
            if scope["query_string"] and batch_api.is_submission(scope["query_string"]):
                limit = self.node.settings.batch_max_size
                answer = await batch_api.submit(self.batches, model, body, limit)
            elif (request_id := batch_api.is_poll(body)) is not None:
                answer = await batch_api.poll(self.batches, model, request_id)
            if answer is not None:
                status, content = answer
                if status == 200:
                    payload = {**content, "success": True, "errors": [], "messages": []}
                    await _respond(send, 200, json.dumps(payload).encode())
                else:
                    await _respond(send, status, _error(True, status, content["error"]))
                return
        if not model.ready_replicas and (problem := self._refused_before_start(model, body)):
            # Nothing would run it anyway: say so now rather than after a cold start.
            await _respond(send, 400, _error(True, 400, problem))
            self.metrics.observe(model.name, 400, time.perf_counter() - started)
            return
        reject = b"rejectIfBusy" in body and _reject_if_busy(body)
        if b'"stream"' in body and _wants_stream(body):
            await self._stream(receive, send, model, body, started, reject)
            return
        await self._forward(send, model, Kind.RUN_JSON, [body], started, True, reject)

    def _refused_before_start(self, model: ServedModel, body: bytes) -> str:
        """Why a model with no replica ready would refuse ``body`` (not a JSON object, or not
        what its input schema allows), or "" when only the worker can tell."""
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _not_an_input(model, f"not valid JSON ({exc})")
        except RecursionError:
            return _not_an_input(model, "JSON nested too deeply")
        if not isinstance(value, dict):
            kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
            return _not_an_input(model, f"JSON {kinds.get(type(value), 'a number')}, not an object")
        if model not in self._input_checks:
            spec = model.spec
            self._input_checks[model] = (
                InputCheck(model.name, spec.input_schema) if spec.input_schema_exact else None
            )
        check = self._input_checks[model]
        return check.problem(value) if check is not None else ""

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        model: ServedModel,
        body: bytes,
        started: float,
        reject_if_busy: bool,
    ) -> None:
        """``"stream": true``: server-sent events, one ``data: {chunk}`` per chunk as the
        engine yields it, then ``data: [DONE]``. Until the first chunk nothing is sent, so an
        error before it (bad input, a full queue) is an ordinary JSON error response; one after
        it is an ``event: error`` in the stream. A client that goes away cancels the engine's
        generator."""
        stream = sse.StreamedCall(model, body, receive, reject_if_busy)
        opened = False
        status = 200
        try:
            async for chunk in stream:
                if not opened:
                    opened = True
                    await send(sse.START)
                await send(sse.event(b"data: " + chunk + b"\n\n"))
            if stream.client_gone:
                status = 499  # the client closed the connection
                return
            try:
                status, _, final = stream.result()
            except ModelBusy as exc:
                status, final = 429, _error(True, 429, str(exc))
            except ModelUnavailable as exc:
                status, final = 503, _error(True, 503, str(exc))
            if not opened and status != 200:
                await _respond(send, status, final)
                return
            if not opened:
                await send(sse.START)
            if status == 200:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            else:
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"event: error\ndata: " + final + b"\n\n",
                    }
                )
        except OSError:  # the client went away while we wrote
            status = 499
        finally:
            stream.close()  # whatever ended this, the engine's generator stops too
            elapsed = time.perf_counter() - started
            model.stats.record(status == 200, int(elapsed * 1e9))
            self.metrics.observe(model.name, status, elapsed)

    async def _forward(
        self,
        send: Send,
        model: ServedModel,
        kind: int,
        parts: list[bytes],
        started: float,
        ai: bool,
        reject_if_busy: bool = False,
    ) -> None:
        extra: list[tuple[bytes, bytes]] = []
        try:
            status, header_length, body = await model.call(kind, parts, reject_if_busy)
        except ModelBusy as exc:
            status, header_length, body = 429, 0, _error(ai, 429, str(exc))
        except ModelUnavailable as exc:
            status, header_length, body = 503, 0, _error(ai, 503, str(exc))
            extra = [(b"retry-after", str(exc.retry_after).encode())]
        elapsed = time.perf_counter() - started
        model.stats.record(status == 200, int(elapsed * 1e9))
        self.metrics.observe(model.name, status, elapsed)
        if header_length:
            extra.append((b"inference-header-content-length", str(header_length).encode()))
            await _respond(send, status, body, b"application/octet-stream", extra)
        else:
            await _respond(send, status, body, JSON, extra)

    async def _read_body(self, scope: Scope, receive: Receive, model: ServedModel) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise self._too_large(model)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > self.max_body:
                raise self._too_large(model)
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large(model)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, model: ServedModel) -> HTTPError:
        self.metrics.observe(model.name, 413, 0.0)
        return BodyTooLarge(
            413,
            f"model '{model.name}': the request body is larger than the server's limit of "
            f"{self.max_body} bytes (server.max_body_size in omni.toml)",
        )

    # -- health and metadata -------------------------------------------------------------

    async def live(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await _respond(send, 200, b"")

    async def ready(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await _respond(send, 200 if self.node.ready else 503, b"")

    async def server_metadata(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await _respond_json(
            send,
            {
                "name": "omni",
                "version": __version__,
                "extensions": [
                    "binary_tensor_data",
                    "model_repository",
                    "statistics",
                    "model_configuration",
                ],
                "isolation": self.node.backend.description,
            },
        )

    async def model_metadata(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        spec = model.spec
        await _respond_json(
            send,
            {
                "name": spec.name,
                "versions": ["1"],
                "platform": "omni",
                "inputs": [_tensor(t) for t in spec.inputs],
                "outputs": [_tensor(t) for t in spec.outputs],
            },
        )

    async def model_ready(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        await _respond(send, 200 if model.state is ModelState.READY else 400, b"")

    async def model_config(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        spec = model.spec
        await _respond_json(
            send,
            {
                "name": spec.name,
                "platform": "omni",
                "backend": "omni",
                "max_batch_size": spec.max_batch_size,
                "input": [_config_tensor(t) for t in spec.inputs],
                "output": [_config_tensor(t) for t in spec.outputs],
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
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        await _respond_json(send, {"model_stats": [_stats(model)]})

    async def all_stats(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await _respond_json(send, {"model_stats": [_stats(m) for m in self.models.values()]})

    # -- repository extension ------------------------------------------------------------

    async def repository_index(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        body = await receive()
        try:
            request = json.loads(body.get("body") or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise HTTPError(400, f"repository index: the body is not valid JSON: {exc}") from None
        only_ready = isinstance(request, dict) and bool(request.get("ready"))
        index: list[dict[str, Any]] = []
        for model in self.models.values():
            if only_ready and model.state is not ModelState.READY:
                continue
            entry = {
                "name": model.name,
                "version": "1",
                "state": model.state.value,
                "reason": model.reason,
                "replicas": model.ready_replicas,
            }
            index.append(entry)
        if not only_ready:
            for failure in self.node.failures:
                index.append(
                    {
                        "name": failure.package_dir.name,
                        "version": "",
                        "state": "UNAVAILABLE",
                        "reason": failure.error,
                    }
                )
        await _respond_json(send, index)

    async def repository_load(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        error = await self.node.load(model)
        if error and model.closing:
            raise HTTPError(503, error, [(b"retry-after", b"5")])
        if error:
            raise HTTPError(400, f"failed to load model '{model.name}': {error}")
        await _respond(send, 200, b"")

    async def repository_unload(
        self, scope: Scope, receive: Receive, send: Send, model: ServedModel
    ) -> None:
        await self.node.unload(model)
        await _respond(send, 200, b"")

    async def batch_index(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        """``GET /ai/batch``: this node's asynchronous batches (the admin token guards it)."""
        if self.batches is None:
            raise HTTPError(404, "this runtime keeps no batch queue")
        batches = await batch_api.batch_index(self.batches)
        payload = {"result": batches, "success": True, "errors": [], "messages": []}
        await _respond(send, 200, json.dumps(payload).encode())

    # -- the rest ------------------------------------------------------------------------

    async def metrics_page(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        await _respond(
            send, 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
        )

    async def openapi(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        if self._openapi is None:
            specs = [m.spec for m in self.models.values()]
            auth = bool(self._accepted[Access.API])
            self._openapi = json.dumps(build_openapi(specs, __version__, auth)).encode()
        await _respond(send, 200, self._openapi)

    async def unknown_model(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        path: str = scope["path"]
        name = (
            path.removeprefix("/ai/run/")
            .removeprefix("/v2/models/")
            .removeprefix("/v2/repository/models/")
        )
        known = ", ".join(sorted(self.models)) or "none"
        raise HTTPError(404, f"unknown model '{name}' (served models: {known})")

    async def not_found(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        raise HTTPError(404, f"no route for {scope['method']} {scope['path']}")

    async def method_not_allowed(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        raise HTTPError(405, f"{scope['method']} is not allowed on {scope['path']}")

    def _no_such_version(self, version: str) -> Callable[..., Awaitable[None]]:
        async def handler(scope: Scope, receive: Receive, send: Send, _: None) -> None:
            raise HTTPError(
                404, f"model version {version!r} does not exist; Omni serves version '1'"
            )

        return handler


_FIXED_ROUTES = {
    ("GET", "/v2/health/live"): "live",
    ("GET", "/v2/health/ready"): "ready",
    ("GET", "/v2"): "server_metadata",
    ("GET", "/v2/"): "server_metadata",
    ("POST", "/v2/repository/index"): "repository_index",
    ("GET", "/v2/models/stats"): "all_stats",
    ("GET", "/metrics"): "metrics_page",
    ("GET", "/openapi.json"): "openapi",
    ("GET", "/ai/batch"): "batch_index",
}
_OPEN_HANDLERS = {"live", "ready", "metrics_page"}  # health, and what Prometheus scrapes
_MODEL_ROUTES = {
    ("POST", "/infer"): "v2_infer",
    ("GET", "/ready"): "model_ready",
    ("GET", "/config"): "model_config",
    ("GET", "/stats"): "model_stats",
    ("GET", ""): "model_metadata",
}


def _family_error(path: str, status: int, message: str) -> bytes:
    """An error body in the shape of the route's family: OpenAI, Workers AI or KServe v2."""
    if path.startswith("/v1/"):
        return openai_error(status, message)
    return _error(path.startswith("/ai/"), status, message)


def _error(ai: bool, status: int, message: str) -> bytes:
    """An error body in the envelope of the route's family: Workers AI or KServe v2."""
    return ai_error_body(status, message) if ai else v2_error_body(message)


def _not_an_input(model: ServedModel, problem: str) -> str:
    return f"model '{model.name}': the body is {problem}; send the model's input"


def _wants_stream(body: bytes) -> bool:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False  # the worker reports the malformed body
    return isinstance(request, dict) and request.get("stream") is True


def _reject_if_busy(body: bytes) -> bool:
    try:
        options = json.loads(body).get("options")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
        return False  # the worker reports the malformed body
    return isinstance(options, dict) and options.get("rejectIfBusy") is True


def _tensor(t: dict[str, Any]) -> dict[str, Any]:
    return {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]}


def _config_tensor(t: dict[str, Any]) -> dict[str, Any]:
    datatype = "STRING" if t["datatype"] == "BYTES" else t["datatype"]
    entry = {"name": t["name"], "data_type": f"TYPE_{datatype}", "dims": t["shape"]}
    if t.get("optional"):
        entry["optional"] = True
    return entry


def _stats(model: ServedModel) -> dict[str, Any]:
    s = model.stats
    return {
        "name": model.name,
        "version": "1",
        "last_inference": s.last_inference_ms,
        "inference_count": s.success_count,
        "execution_count": s.success_count,
        "inference_stats": {
            "success": {"count": s.success_count, "ns": s.success_ns},
            "fail": {"count": s.fail_count, "ns": s.fail_ns},
            "queue": {"count": s.queue_count, "ns": s.queue_ns},
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": 0, "ns": 0},
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, value: Any) -> None:
    await _respond(send, 200, json.dumps(value).encode())
