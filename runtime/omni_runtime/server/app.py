"""The HTTP front door: one ASGI application over the route table of every surface.

A plain ASGI application rather than a framework: the infer routes are the hot path, and all
that happens here is a lookup of the request line (cached per model route), the bearer token
checked once against precomputed header values, and the handler of the route's surface
(``kserve``, ``ai_run``, ``openai_api``). Header size and body time limits live in
``connection.py``, below ASGI. The surfaces reach the models only through
``omni_runtime.scheduler.ModelHandle``; requests are counted there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from omni_runtime.batch.runner import BatchRunner
from omni_runtime.scheduler import ModelDirectory, ModelHandle
from omni_runtime.scheduler.rollout import Rollouts
from omni_runtime.scheduler.trace import TRACE, Trace, route_of
from omni_runtime.server.ai_run import AiRunRoutes
from omni_runtime.server.fleet_api import FleetRoutes
from omni_runtime.server.http import (
    JSON,
    ClientGone,
    HTTPError,
    Receive,
    Scope,
    Send,
    family_error,
    respond,
)
from omni_runtime.server.kserve import KServeRoutes, Reply, binary_header_length
from omni_runtime.server.model_files import ModelFiles
from omni_runtime.server.openai_api import OpenAIRoutes
from omni_runtime.server.openapi import build_openapi
from omni_runtime.server.rollout_api import RolloutRoutes
from omni_runtime.server.routes import Resolved, Route, RouteTable, Why
from omni_runtime.server.shared_memory import SharedMemory
from omni_runtime.server.shm_api import SharedMemoryRoutes
from omni_runtime.server.tokens import Access, Tokens, authorized
from omni_sdk import __version__

__all__ = ["OmniApp", "route_list"]

log = logging.getLogger("omni.server")

_ROUTE_CACHE_LIMIT = 4096
# How Triton starts the message for a model or version it does not serve; clients match it.
TRITON_UNKNOWN = "Request for unknown model"
_BEARER = [(b"www-authenticate", b"Bearer")]
# A route as the dispatcher keeps it: handler, model, accepted Authorization values, access,
# whether it names its version itself (direct), and whether it may go the hot way.
_Prepared = tuple[Any, Any, tuple[bytes, ...], Access, bool, bool]


def route_list(
    app: OmniApp,
    kserve: KServeRoutes,
    ai: AiRunRoutes,
    openai: OpenAIRoutes,
    rollout: RolloutRoutes,
    shm: SharedMemoryRoutes,
    fleet: FleetRoutes | None = None,
) -> list[Route]:
    """Every HTTP route Omni answers, and who may call it (DESIGN.md, HTTP routes)."""
    open_, api, admin = Access.OPEN, Access.API, Access.ADMIN
    between_nodes = []
    if fleet is not None:  # what the nodes of a fleet ask one another (docs/fleet.md)
        between_nodes = [
            Route("GET", "/fleet/capacity", fleet.capacity, api),
            Route("POST", "/fleet/call/{model}", fleet.call, api),
        ]
    return [
        *between_nodes,
        # KServe v2: health, server metadata, statistics
        Route("GET", "/v2/health/live", kserve.live, open_),
        Route("GET", "/v2/health/ready", kserve.ready, open_),
        Route("GET", "/v2", kserve.server_metadata, api),
        Route("GET", "/v2/", kserve.server_metadata, api),
        Route("GET", "/v2/models/stats", kserve.all_stats, api),
        # KServe v2: one model (also under /versions/{version})
        Route("POST", "/v2/models/{model}/infer", kserve.infer, api, versioned=True),
        Route("GET", "/v2/models/{model}/ready", kserve.model_ready, api, versioned=True),
        Route("GET", "/v2/models/{model}/config", kserve.model_config, api, versioned=True),
        Route("GET", "/v2/models/{model}/stats", kserve.model_stats, api, versioned=True),
        Route("GET", "/v2/models/{model}", kserve.model_metadata, api, versioned=True),
        # Triton's repository extension
        Route("POST", "/v2/repository/index", kserve.repository_index, admin),
        Route("POST", "/v2/repository/models/{model}/load", kserve.repository_load, admin),
        Route("POST", "/v2/repository/models/{model}/unload", kserve.repository_unload, admin),
        Route("POST", "/v2/repository/models/{model}/rollout", rollout.start, admin),
        Route("GET", "/v2/repository/models/{model}/rollout", rollout.status, admin),
        Route("DELETE", "/v2/repository/models/{model}/rollout", rollout.abort, admin),
        # Triton's shared-memory extensions ({name}: a region's name, not a model's)
        Route("GET", "/v2/systemsharedmemory/status", shm.status, api),
        Route("GET", "/v2/systemsharedmemory/region/{name}/status", shm.region_status, api),
        Route("POST", "/v2/systemsharedmemory/region/{name}/register", shm.register, api),
        Route("POST", "/v2/systemsharedmemory/unregister", shm.unregister_all, api),
        Route("POST", "/v2/systemsharedmemory/region/{name}/unregister", shm.unregister, api),
        Route("GET", "/v2/cudasharedmemory/status", shm.cuda_status, api),
        Route("GET", "/v2/cudasharedmemory/region/{name}/status", shm.cuda_region_status, api),
        Route("POST", "/v2/cudasharedmemory/region/{name}/register", shm.cuda_register, api),
        Route("POST", "/v2/cudasharedmemory/unregister", shm.cuda_unregister, api),
        Route("POST", "/v2/cudasharedmemory/region/{name}/unregister", shm.cuda_unregister, api),
        # Workers AI
        Route("POST", "/ai/run/{model}", ai.run, api),
        Route("GET", "/ai/batch", ai.batch_index, admin),
        # OpenAI
        Route("GET", "/v1/models", openai.list_models, api),
        Route("POST", "/v1/embeddings", openai.embeddings, api),
        Route("POST", "/v1/chat/completions", openai.chat_completions, api),
        Route("POST", "/v1/completions", openai.completions, api),
        # the rest
        Route("GET", "/metrics", app.metrics_page, open_),
        Route("GET", "/openapi.json", app.openapi, api),
    ]


class OmniApp:
    """ASGI application over the node's models."""

    def __init__(
        self,
        models: ModelDirectory,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        tokens: Tokens | None = None,
        batches: BatchRunner | None = None,
        node: str | None = None,
        fleet: FleetRoutes | None = None,
        rollouts: Rollouts | None = None,
        files: ModelFiles | None = None,
    ) -> None:
        self.models = models
        self.node = node  # in a fleet: every answer names the node that served it
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self.tokens = tokens or Tokens()
        self._accepted = {access: self.tokens.accepted(access) for access in Access}
        # the regions, shared with the gRPC service
        self.shared_memory = SharedMemory(max_request_bytes=models.settings.max_body_size)
        self.kserve = kserve = KServeRoutes(models, self.shared_memory, files)
        self.surfaces = (
            kserve,
            AiRunRoutes(models, batches),
            OpenAIRoutes(models),
            RolloutRoutes(rollouts, models.settings.max_body_size),
            SharedMemoryRoutes(self.shared_memory, models.settings.max_body_size),
        )
        self.table = RouteTable(route_list(self, *self.surfaces, fleet), models)
        self._cache: dict[tuple[str, str], _Prepared] = {}
        self._generation = models.generation  # the cache holds handles of this generation
        self._openapi: bytes | None = None

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

    # -- dispatch ------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        handler, model, accepted, access, direct, _ = self._route(method, path)
        if not direct and (self.node is not None or model is not None):
            trace = Trace(route_of(scope["headers"]) if self.node is not None else [])
            TRACE.set(trace)
            send = _traced(send, trace, self.node, model.spec.version if model else None)
        if accepted and not authorized(scope["headers"], accepted):
            await self._unauthorized(scope, send, access)
            return
        try:
            await handler(scope, receive, send, model)
        except ClientGone:
            pass  # nobody is left to answer
        except Exception as exc:  # a bug here must cost one request, never the server
            await respond(send, *_error_reply(method, path, exc, model if direct else None))

    def _route(self, method: str, path: str) -> _Prepared:
        """The request line's route, from the cache while no model came or went."""
        if self.models.generation != self._generation:
            self._cache.clear()
            self._generation = self.models.generation
        return self._cache.get((method, path)) or self._prepare(method, path)

    def _prepare(self, method: str, path: str) -> _Prepared:
        resolved = self.table.resolve(method, path)
        handler = resolved.handler or _refusal(resolved, method, path, self.models, self.kserve)
        model, version = resolved.model, resolved.version
        # A version route reaches the model's current version ("1", Triton's default, is an
        # alias of it) or one being rolled out beside it.
        if version is not None and model is not None and version not in ("1", model.spec.version):
            other = self.models.version(model.name, version)
            if other is None:
                handler = _no_such_version(model.name, version, model.spec.version)
            else:
                model = other
        # The hot routes (infer, /ai/run) name the version in their answers themselves, where
        # nothing else is to be added to them: no per-request trace, no wrapped send.
        direct = (
            self.node is None
            and type(model) is ModelHandle
            and getattr(handler, "names_version", False)
        )
        hot = direct and getattr(handler, "__func__", None) is KServeRoutes.infer
        accepted = self._accepted[resolved.access]
        prepared = (handler, model, accepted, resolved.access, direct, hot)
        if model is not None and len(self._cache) < _ROUTE_CACHE_LIMIT:
            self._cache[(method, path)] = prepared
        return prepared

    # -- the hot path (server/hot_path.py) ---------------------------------------------

    def hot_route(self, path: str, headers: list[tuple[bytes, bytes]]) -> ModelHandle | None:
        """The model whose infer route ``POST path`` is, where the connection may answer the
        request itself (``hot_reply``): a model served here, outside a fleet and a rollout's
        split, and a request whose token, where one is needed, is good. None: the request
        goes through the ASGI application (which answers a bad token, too)."""
        _, model, accepted, _, _, hot = self._route("POST", path)
        if not hot or (accepted and not authorized(headers, accepted)):
            return None
        return cast(ModelHandle, model)

    async def hot_reply(
        self,
        path: str,
        model: ModelHandle,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        started: float,
    ) -> Reply:
        """The reply to an infer request that ``hot_route`` let through, its body read:
        the one ``_http`` gives, errors included."""
        try:
            header_length = binary_header_length(headers, model)
            return await self.kserve.infer_reply(model, headers, header_length, body, started)
        except Exception as exc:  # a bug here must cost one request, never the server
            return _error_reply("POST", path, exc, model)

    async def _unauthorized(self, scope: Scope, send: Send, access: Access) -> None:
        path: str = scope["path"]
        sent = any(name == b"authorization" for name, _ in scope["headers"])
        admin = access is Access.ADMIN and self.tokens.admin
        variable = "OMNI_ADMIN_TOKEN" if admin else "OMNI_API_TOKEN"
        if sent:
            message = f"the bearer token is not valid for {path} (it needs the server's {variable})"
        else:
            message = (
                f"{path} needs a bearer token: send 'Authorization: Bearer TOKEN' with the "
                f"server's {variable}"
            )
        await respond(send, 401, family_error(path, HTTPError(401, message)), extra=_BEARER)

    # -- the node's own routes -----------------------------------------------------------

    async def metrics_page(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        await respond(send, 200, self.models.metrics.render(), content_type)

    async def openapi(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        if self._openapi is None:
            specs = [m.spec for m in self.models]
            auth = bool(self._accepted[Access.API])
            self._openapi = json.dumps(build_openapi(specs, __version__, auth)).encode()
        await respond(send, 200, self._openapi)


Handler = Callable[[Scope, Receive, Send, Any], Awaitable[None]]


def _error_reply(method: str, path: str, exc: Exception, model: ModelHandle | None) -> Reply:
    """The answer to a request whose handler raised ``exc`` (in its ``except``): an
    ``HTTPError`` in the route family's envelope, naming ``model``'s version where the route
    names its own; anything else a 500 that names the route, logged."""
    if isinstance(exc, HTTPError):
        extra = [*exc.headers, model.version_header] if model is not None else exc.headers
        return exc.status, family_error(path, exc), JSON, extra
    log.exception("%s %s failed", method, path)
    message = f"internal error handling {method} {path}; see the runtime's log"
    return 500, family_error(path, HTTPError(500, message)), JSON, []


def _traced(send: Send, trace: Trace, node: str | None, version: str | None) -> Send:
    """``send``, adding ``Omni-Model-Version`` to the answer of a model's route (the version
    that answered: here, the one a rollout chose, or the peer's), and in a fleet
    ``Omni-Node`` (and ``Omni-Route`` once forwarded)."""

    async def traced(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            extra = []
            if node is not None:
                extra.append((b"omni-node", (trace.served_by or node).encode()))
                route = trace.route or (",".join([*trace.nodes, node]) if trace.nodes else None)
                if route:
                    extra.append((b"omni-route", route.encode()))
            served_version = trace.version or version
            if served_version:
                extra.append((b"omni-model-version", served_version.encode()))
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return traced


def _refusal(
    resolved: Resolved, method: str, path: str, models: ModelDirectory, kserve: KServeRoutes
) -> Handler:
    """The handler of a request line that resolved to no route: a 404 or 405 saying why (a
    load request for a model not served here may carry its files: see kserve.load_unknown)."""
    if resolved.why is Why.UNKNOWN_MODEL:
        known = ", ".join(models.names()) or "none"
        if path.startswith("/v2/repository/models/") and path.endswith("/load"):
            refusal = f"failed to load '{resolved.name}': no such model (served models: {known})"
            if method == "POST":
                return cast(Handler, kserve.load_unknown(resolved.name, refusal))
            status, message = 400, f"failed to load '{resolved.name}': no such model"
        elif path.startswith("/v2/"):  # Triton's words, which its clients look for
            status, message = 404, f"{TRITON_UNKNOWN}: '{resolved.name}' is not found"
        else:
            status, message = 404, f"unknown model '{resolved.name}'"
        message += f" (served models: {known})"
    elif resolved.why is Why.METHOD:
        status, message = 405, f"{method} is not allowed on {path}"
    else:
        status, message = 404, f"no route for {method} {path}"

    async def refuse(scope: Scope, receive: Receive, send: Send, _: Any) -> None:
        raise HTTPError(status, message)

    return refuse


def _no_such_version(name: str, version: str, served: str) -> Handler:
    async def refuse(scope: Scope, receive: Receive, send: Send, _: Any) -> None:
        raise HTTPError(
            404,
            f"{TRITON_UNKNOWN}: '{name}' version {version!r} is not found; it serves version "
            f"{served!r} (also reached as '1')",
        )

    return refuse
