"""A coroutine whose first step runs at once, the rest in a Task (3.12's eager tasks, on 3.11).

``loop.create_task(coro)`` runs nothing until the loop's next turn. On the hot path that turn
lies between a request's last byte and its trip to the worker: at concurrency 1, 10-15 µs of a
request's latency (docs/benchmarks.md). ``start_eagerly`` runs the coroutine's first step
inside the caller (the connection's ``data_received``), up to its first wait, which on the hot
path is the worker's answer; only then does a Task take it over, while the worker works.

Inside the first step ``asyncio.current_task()`` is None: code that runs there must not need
a Task (``asyncio.timeout``, for one). From its first wait on, the coroutine runs in a Task and
in a copy of the caller's context, as ``create_task`` would have run it; cancelling the Task
cancels what the coroutine waits for, as it would with a Task of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start_eagerly"]


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` up to its first wait now; the Task that runs the rest, or None where it
    finished within that step. An exception it raises there is raised here."""
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_rest(coro, waiting), context=context)


async def _rest(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _resume(coro, waiting)  # (a Task takes a coroutine, not a generator, on 3.12)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, None, None]:
    """Drive ``coro`` on from its first wait, ``waiting`` (a future, or None for one turn of
    the loop): this generator yields to its Task what ``coro`` yields, and passes into
    ``coro`` what the Task sends or throws (a cancellation)."""
    while True:
        try:
            yield waiting
        except BaseException as exc:  # the Task's cancellation: the coroutine decides
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
