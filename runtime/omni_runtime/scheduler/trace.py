"""Which nodes a request passed, and which one answered it (``Omni-Route``, ``Omni-Node``).

One ``Trace`` per request, in a context variable: the HTTP app sets it from the request's
``Omni-Route`` header, the router fills in who answered, and the app writes both back.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

__all__ = ["TRACE", "Trace", "route_of"]


@dataclass
class Trace:
    """The nodes one request passed (``Omni-Route``) and the one that answered it."""

    nodes: list[str] = field(default_factory=list)
    served_by: str | None = None
    route: str | None = None  # as the answering node gave it
    version: str | None = None  # of the model that answered, when another node did


TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("omni_trace", default=None)


def route_of(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The nodes an ``Omni-Route`` header names, in order (none when it is absent)."""
    for name, value in headers:
        if name == b"omni-route":
            return [n for n in value.decode("latin-1").split(",") if n][:16]
    return []
