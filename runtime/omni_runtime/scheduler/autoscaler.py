"""How many replicas a model wants: Knative's KPA over a clock, with no asyncio and no processes.

Every tick the controller (or the simulator) reports a model's ongoing requests, in flight and
queued. The autoscaler keeps a time-weighted average of that over two windows:

- the **stable window** (60 s): replicas = ceil(average / target_ongoing_requests);
- the **panic window** (6 s): when it asks for at least twice the replicas running, the model
  enters panic mode for a stable window: it scales up at once to what the panic window asks
  for and does not scale down until the panic is over.

A model with no request for ``idle_timeout`` falls to ``min_replicas`` (zero: scale to zero);
one with requests waiting and no replica gets, at once, enough replicas for what is waiting.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from omni_sdk import Scaling

__all__ = ["Autoscaler", "ScaleTarget"]

PANIC_THRESHOLD = 2.0  # panic when the panic window asks for this multiple of the replicas


@dataclass(frozen=True)
class ScaleTarget:
    """The replicas a model wants now, and why, in words a user will read in the log."""

    replicas: int
    reason: str
    panic: bool = False


class Autoscaler:
    """One model's demand over time, and the replica count it asks for."""

    def __init__(self, scaling: Scaling, stable_window: float, panic_window: float) -> None:
        self.scaling = scaling
        self.stable_window = stable_window
        self.panic_window = min(panic_window, stable_window)
        # A step function of ongoing requests, as running integrals: at _times[i] the value
        # became _values[i], and _integrals[i] is the integral from _times[0] up to then.
        # Averages over any window are then two lookups, not a walk over every sample.
        self._times: list[float] = []
        self._values: list[float] = []
        self._integrals: list[float] = []
        self._head = 0  # entries before it are older than the stable window
        self._last_time: float | None = None
        self._last_value = 0.0
        self._panic_until = -math.inf
        self._panic_replicas = 0
        self.last_request: float | None = None
        self.evicted = False  # its last replica was evicted: none until its next request

    def observe(self, now: float, ongoing: float, requested: bool = False) -> None:
        """Record that ``ongoing`` requests were in flight or queued at ``now``.

        ``requested`` says a request arrived since the last observation (it may already be
        done, and still counts as activity for ``idle_timeout``).
        """
        if requested or ongoing > 0:
            self.last_request = now
            self.evicted = False
        value = float(ongoing)
        if self._last_time is not None and now < self._last_time:
            now = self._last_time  # a clock that went back: treat it as the same instant
        if self._times and value == self._last_value:
            self._last_time = now  # the step function goes on as it was: nothing to record
            return
        if self._times and now == self._times[-1]:
            self._values[-1] = value  # the same instant: the newest value wins
        else:
            integral = self._integral_at(now) if self._times else 0.0
            self._times.append(now)
            self._values.append(value)
            self._integrals.append(integral)
        self._last_time = now
        self._last_value = value
        horizon = now - self.stable_window
        head = self._head
        while head + 1 < len(self._times) and self._times[head + 1] <= horizon:
            head += 1
        self._head = head
        if head > 4096:  # forget what no window reaches any more
            del self._times[:head], self._values[:head], self._integrals[:head]
            self._head = 0

    def _integral_at(self, time: float) -> float:
        """Integral of the step function from its first sample up to ``time``."""
        times = self._times
        if time >= times[-1]:
            i = len(times) - 1
        else:
            i = max(self._head, bisect.bisect_right(times, time, self._head) - 1)
        return self._integrals[i] + self._values[i] * max(0.0, time - times[i])

    def average(self, now: float, window: float) -> float:
        """Time-weighted mean of ongoing requests over the last ``window`` seconds."""
        if not self._times:
            return self._last_value
        start = max(now - window, self._times[self._head])
        weight = now - start
        if weight <= 0.0:
            return self._last_value
        return (self._integral_at(now) - self._integral_at(start)) / weight

    def target(self, now: float, current: int) -> ScaleTarget:
        """The replicas wanted at ``now`` with ``current`` replicas running or starting."""
        s = self.scaling
        stable = self.average(now, self.stable_window)
        panic = self.average(now, self.panic_window)
        per = s.target_ongoing_requests
        stable_want = math.ceil(stable / per - 1e-9)
        panic_want = math.ceil(panic / per - 1e-9)
        if current == 0:
            # From zero, what is waiting now is the only signal there is (Knative's
            # activator does the same): start enough replicas for it at once.
            panic = max(panic, self._last_value)
            panic_want = max(panic_want, math.ceil(self._last_value / per - 1e-9))
        if (current > 0 and panic_want >= PANIC_THRESHOLD * current) or (
            current == 0 and panic_want > 0
        ):
            if now >= self._panic_until:
                self._panic_replicas = 0
            self._panic_until = now + self.stable_window
        if now < self._panic_until:
            self._panic_replicas = max(self._panic_replicas, panic_want, current)
            want = self._panic_replicas
            reason = (
                f"burst: {panic:.1f} ongoing requests over the last {self.panic_window:g}s, "
                f"target {per} per replica"
            )
            panicking = True
        else:
            want = stable_want
            reason = (
                f"{stable:.1f} ongoing requests over the last {self.stable_window:g}s, "
                f"target {per} per replica"
            )
            panicking = False
        idle = (
            self.evicted or self.last_request is None or now - self.last_request >= s.idle_timeout
        )
        if self._last_value > 0 and want < 1:  # requests are waiting right now
            want = 1
            reason = f"{self._last_value:g} requests waiting or in flight now"
        elif idle:
            want = 0
            self._panic_until, self._panic_replicas = -math.inf, 0  # a burst long gone
            if self.evicted:
                reason = "evicted to make room; it starts again on its next request"
            elif self.last_request is None:
                reason = "never requested"
            else:
                reason = (
                    f"no requests for {now - self.last_request:.0f}s "
                    f"(idle_timeout {s.idle_timeout:g}s)"
                )
        elif want < 1:  # recently used: keep one until idle_timeout
            want = 1
            assert self.last_request is not None
            reason = (
                f"requested {now - self.last_request:.0f}s ago, within idle_timeout "
                f"{s.idle_timeout:g}s"
            )
        if want < s.min_replicas:
            want, reason = s.min_replicas, f"min_replicas is {s.min_replicas}"
        if want > s.max_replicas:
            want = s.max_replicas
            reason += f" (capped at max_replicas {s.max_replicas})"
        return ScaleTarget(want, reason, panicking)
