"""The route table: every HTTP route as data (method, path, handler, who may call it).

A path is fixed (``/v2/health/live``) or holds one ``{model}``: a model's name, which may
itself contain slashes (``@cf/baai/bge-small-en-v1.5``). A ``versioned`` route also matches
``{model}/versions/{version}``. ``RouteTable.resolve`` turns a request line into a
``Resolved``: the handler, the model's handle, the version asked for, and the access level.
A ``{name}`` is any other name (a shared-memory region's), which the handler reads from the
path itself.
What matches no route still gets an access level (``FAMILY_ACCESS``), so that an unknown path
under the admin routes asks for the admin token like the routes beside it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from omni_runtime.scheduler import ModelDirectory, ModelHandle
from omni_runtime.server.tokens import Access

__all__ = ["FAMILY_ACCESS", "Resolved", "Route", "RouteTable", "Why"]

Handler = Callable[..., Awaitable[None]]  # (scope, receive, send, ModelHandle | None)
_VERSIONED = re.compile(r"^(.*)/versions/([^/]+)$")


# Paths that match no route: the access of the family they belong to (API elsewhere).
FAMILY_ACCESS = (("/v2/repository", Access.ADMIN), ("/ai/batch", Access.ADMIN))


class Why(enum.Enum):
    """Why a request line resolved to no handler."""

    NO_ROUTE = "no route"
    UNKNOWN_MODEL = "unknown model"
    METHOD = "method not allowed"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    access: Access
    versioned: bool = False  # also answers {model}/versions/{version}


@dataclass(frozen=True)
class Resolved:
    handler: Handler | None
    access: Access
    model: ModelHandle | None = None
    version: str | None = None  # as the path gave it, when it gave one
    why: Why | None = None  # set when handler is None
    name: str = ""  # the model name the path gave, for an unknown model


@dataclass(frozen=True)
class _Pattern:
    prefix: str
    suffix: str
    routes: dict[str, Route]  # by method


class RouteTable:
    def __init__(self, routes: Sequence[Route], models: ModelDirectory) -> None:
        self._models = models
        self._fixed: dict[str, dict[str, Route]] = {}
        self._named: dict[tuple[str, str], dict[str, Route]] = {}
        patterns: dict[tuple[str, str], dict[str, Route]] = {}
        for route in routes:
            if "{name}" in route.path:
                prefix, _, suffix = route.path.partition("{name}")
                by_method = self._named.setdefault((prefix, suffix), {})
            elif "{model}" in route.path:
                prefix, _, suffix = route.path.partition("{model}")
                by_method = patterns.setdefault((prefix, suffix), {})
            else:
                by_method = self._fixed.setdefault(route.path, {})
            if route.method in by_method:
                raise ValueError(f"two routes for {route.method} {route.path}")
            by_method[route.method] = route
        # Longest suffix first: ".../infer" is tried before the bare model path.
        self._patterns = sorted(
            (_Pattern(p, s, r) for (p, s), r in patterns.items()),
            key=lambda pattern: (-len(pattern.suffix), -len(pattern.prefix)),
        )

    def resolve(self, method: str, path: str) -> Resolved:
        fixed = self._fixed.get(path)
        if fixed is not None:
            route = fixed.get(method)
            if route is None:
                return Resolved(None, _family_access(path), why=Why.METHOD)
            return Resolved(route.handler, route.access)
        for (prefix, suffix), by_method in self._named.items():
            fits = len(path) > len(prefix) + len(suffix)
            if fits and path.startswith(prefix) and path.endswith(suffix):
                route = by_method.get(method)
                if route is None:
                    return Resolved(None, _family_access(path), why=Why.METHOD)
                return Resolved(route.handler, route.access)
        unknown: Resolved | None = None
        for pattern in self._patterns:
            if not (path.startswith(pattern.prefix) and path.endswith(pattern.suffix)):
                continue
            name = path[len(pattern.prefix) : len(path) - len(pattern.suffix)]
            if not name:
                continue
            found = self._model(name, pattern)
            if found is None:
                access = next(iter(pattern.routes.values())).access
                unknown = unknown or Resolved(None, access, why=Why.UNKNOWN_MODEL, name=name)
                continue
            model, version = found
            route = pattern.routes.get(method)
            if route is None:
                return Resolved(None, _family_access(path), model, version, Why.METHOD)
            return Resolved(route.handler, route.access, model, version)
        return unknown or Resolved(None, _family_access(path), why=Why.NO_ROUTE)

    def _model(self, name: str, pattern: _Pattern) -> tuple[ModelHandle, str | None] | None:
        model = self._models.get(name)
        if model is not None:
            return model, None
        versioned = _VERSIONED.match(name)
        if versioned and any(r.versioned for r in pattern.routes.values()):
            model = self._models.get(versioned.group(1))
            if model is not None:
                return model, versioned.group(2)
        return None


def _family_access(path: str) -> Access:
    for prefix, access in FAMILY_ACCESS:
        if path.startswith(prefix):
            return access
    return Access.API
