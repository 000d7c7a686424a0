"""Polling rather than sleeping, while a core is spare and a worker's answer is due.

A process woken from sleep runs 30-150 µs later on a virtual machine: for a client that waits on
each answer, the two wake-ups of a request's trip to its worker and back cost more than a small
model's work. So, within ``server.busy_poll``:

- the runtime's event loop does not sleep while its workers owe answers, no more of them
  than there are cores besides its own: it runs the loop without blocking (its other
  connections are served as usual) until the answers are in or the time is up;
- a request sent where, counting it, no more answers are owed than there are such cores
  carries FLAG_POLL, and its worker, once it has answered, polls for its next request for
  POLL_NS before it sleeps; one worker at a time.

Answers are counted, not workers: a worker owing several (its pipeline full) or several
workers at work mean requests come faster than one at a time, wake-ups are shared among them,
and polling would take the CPU that the work needs (at concurrency 8 it doubled a worker's
CPU per request). For ``CROWDED_S`` after more answers were owed than there are spare cores,
nothing polls at all: under such load the answers owed fall to one only between waves of
requests, and polling then took the cores that the client and the next wave needed (at
concurrency 8 over gRPC, a fifth of the calls per second). Neither takes a core from the
runtime's own work: the loop polls only when it has nothing else to run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import weakref
from time import perf_counter
from typing import Any

from omni_sdk.wire import FLAG_POLL, POLL_NS

__all__ = ["BusyPoll"]

# After more answers were owed at once than there are spare cores, nothing polls for this long:
# under such load the answers owed drop to a few only between waves of requests, and polling
# then would take the cores that the next wave needs.
CROWDED_S = 0.02
_polls: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPoll] = weakref.WeakKeyDictionary()


class BusyPoll:
    """An event loop's (``BusyPoll.of``; it holds no reference to the loop, which is its key):
    the answers its workers owe, and which worker may poll."""

    def __init__(self, budget: float) -> None:
        self.budget = budget  # seconds; 0: never poll
        self.spare = len(os.sched_getaffinity(0)) - 1  # the runtime's own core is not spare
        self.owed = 0  # answers owed by the loop's workers
        self.deadline = 0.0  # the loop polls until then at most
        self.polling = False  # a _poll is scheduled
        self.poller: object = None  # the worker told to poll last
        self.poller_owed = 0  # ...the flagged answers it still owes
        self.poller_until = 0.0  # ...and until when it may poll after its last one
        self.crowded_until = 0.0  # more answers were owed than spare cores: no polling till then

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, budget: float) -> BusyPoll:
        """The loop's one instance, with ``budget`` (the latest runtime's setting wins)."""
        poll = _polls.get(loop)
        if poll is None:
            poll = _polls[loop] = cls(budget)
        poll.budget = budget
        return poll

    def flags(self, worker: object) -> int:
        """FLAG_POLL for a request about to be sent to ``worker`` where, counting it, no more
        answers are owed than there are cores besides the runtime's, and no other worker is
        polling; else 0."""
        if not self.budget:
            return 0
        if self.owed >= self.spare:
            return 0
        now = perf_counter()
        if now < self.crowded_until:
            return 0
        if worker is not self.poller and (self.poller_owed or now < self.poller_until):
            return 0
        self.poller = worker
        return FLAG_POLL

    def sent(self, answer: asyncio.Future[Any], flags: int) -> None:
        """A request went to a worker: the loop polls until ``answer`` (or the budget) is
        in, while the answers owed are no more than the spare cores."""
        if not self.budget:
            return
        self.owed += 1
        if flags & FLAG_POLL:
            self.poller_owed += 1
        answer.add_done_callback(functools.partial(self._answered, flags))
        now = perf_counter()
        self.deadline = now + self.budget
        if self.owed > self.spare:
            self.crowded_until = now + CROWDED_S
        self._start()

    def _answered(self, flags: int, _: asyncio.Future[Any]) -> None:
        self.owed -= 1
        if flags & FLAG_POLL:
            self.poller_owed -= 1
            self.poller_until = perf_counter() + POLL_NS / 1e9
        self._start()

    def _start(self) -> None:
        if not self.polling and self._wanted():
            self.polling = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _wanted(self) -> bool:
        # Only while each answer owed can have a core besides the loop's, and has had lately.
        return 0 < self.owed <= self.spare and self.crowded_until <= perf_counter() < self.deadline

    def _poll(self) -> None:
        # A callback that schedules itself keeps the loop from blocking in epoll: each turn
        # still runs every ready connection's I/O.
        if self._wanted():
            asyncio.get_running_loop().call_soon(self._poll)
        else:
            self.polling = False
