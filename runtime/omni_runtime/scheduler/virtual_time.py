"""An asyncio event loop on a virtual clock: the simulator's and the scheduler tests' time.

The loop's ``time()`` is a number that moves only when nothing is ready to run: then it jumps
to the next timer instead of sleeping until it. Everything written against the loop
(``asyncio.sleep``, ``wait_for``, ``call_later``, and a controller given ``loop.time`` as its
clock) runs unchanged, as fast as the CPU allows, and gives the same answer every time.
There is no I/O on this loop: a wait for something that no timer will ever bring is a
deadlock, and raises ``SimulationStalled`` rather than hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any

__all__ = ["SimulationStalled", "VirtualTimeLoop"]


class SimulationStalled(RuntimeError):
    """Every task waits and no timer is due: nothing could ever happen again."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector with nothing to select: a wait advances the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalled(
                f"at t={self._loop.time():.3f}s every task waits and no timer is due"
            )
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``asyncio.SelectorEventLoop`` whose clock starts at ``start`` and jumps between timers."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        super().__init__(_VirtualSelector(self))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds
