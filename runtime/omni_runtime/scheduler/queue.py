"""A model's runtime-side queue: bounded, two priority classes, each waiter with a deadline.

A request that finds no replica with room waits here for a slot. The slot is handed to it
(the future's result is the replica) when a replica finishes a request or a new one becomes
ready; interactive requests are served before batch ones, each class in arrival order.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Generic, TypeVar

__all__ = ["ModelBusy", "ModelUnavailable", "Priority", "RequestQueue"]

T = TypeVar("T")


class ModelUnavailable(Exception):
    """503: the model cannot serve right now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelBusy(Exception):
    """429: the model's queue is full, or the client asked not to wait."""


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    BATCH = 1


class RequestQueue(Generic[T]):
    """Waiters for a slot on a replica of type ``T``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._classes: tuple[deque[asyncio.Future[T]], ...] = (deque(), deque())
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def push(self, priority: Priority = Priority.INTERACTIVE) -> asyncio.Future[T]:
        """A future that will hold the replica whose slot this request gets."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._classes[priority].append(future)
        self._length += 1
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: asyncio.Future[T]) -> None:
        # A waiter that timed out, was cancelled or failed leaves the queue.
        if future.cancelled() or future.exception() is not None:
            for waiters in self._classes:
                try:
                    waiters.remove(future)
                except ValueError:
                    continue
                self._length -= 1
                return

    def pop(self) -> asyncio.Future[T] | None:
        """The next waiter still waiting, interactive first; None when there is none."""
        for waiters in self._classes:
            while waiters:
                future = waiters.popleft()
                self._length -= 1
                if not future.done():
                    return future
        return None

    def fail_all(self, error: Exception) -> None:
        """Answer every waiter with ``error`` (the model was unloaded, or failed to load)."""
        while (future := self.pop()) is not None:
            future.set_exception(error)
