"""Which nodes a request passed, and which one answered it (``Omni-Route``, ``Omni-Node``).

One ``Trace`` per request, in a context variable: the HTTP app sets it from the request's
``Omni-Route`` header, the router fills in who answered, and the app writes both back.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

__all__ = ["TRACE", "Trace", "answered_by", "route_of", "version_header"]


@dataclass
class Trace:
    """The nodes one request passed (``Omni-Route``) and the one that answered it."""

    nodes: list[str] = field(default_factory=list)
    served_by: str | None = None
    route: str | None = None  # as the answering node gave it
    version: str | None = None  # of the model that answered, when another node did
    # Whether the HTTP app's send names the version from ``version`` (see server/app.py);
    # False for a trace made only to say that another version than the one chosen answered.
    named: bool = True


def version_header(default: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The ``Omni-Model-Version`` header a route that names its own version adds to an answer
    (after the call): ``default`` (its handle's), or the version that answered in its place
    when the chosen one was replaced meanwhile; none where the app's send names it."""
    trace = TRACE.get()
    if trace is None:
        return [default]
    if not trace.named and trace.version:
        return [(b"omni-model-version", trace.version.encode())]
    return []


def answered_by(version: str) -> None:
    """Say that ``version`` answered this request, not the one its route chose (a rollout
    replaced it in between)."""
    trace = TRACE.get()
    if trace is None:
        TRACE.set(Trace(version=version, named=False))
    else:
        trace.version = version


TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("omni_trace", default=None)


def route_of(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The nodes an ``Omni-Route`` header names, in order (none when it is absent)."""
    for name, value in headers:
        if name == b"omni-route":
            return [n for n in value.decode("latin-1").split(",") if n][:16]
    return []
