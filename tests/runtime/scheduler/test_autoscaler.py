"""The autoscaler against a fake clock: bursts, steady load, idleness, bounds."""

from __future__ import annotations

from omni_runtime.scheduler import Autoscaler
from omni_sdk import Scaling


def drive(
    scaler: Autoscaler, start: float, end: float, ongoing: float, step: float = 0.25
) -> float:
    """Report ``ongoing`` requests every ``step`` seconds from ``start`` to ``end``."""
    now = start
    while now <= end:
        scaler.observe(now, ongoing, requested=ongoing > 0)
        now += step
    return now - step


def test_steady_load_asks_for_ongoing_over_target() -> None:
    scaler = Autoscaler(Scaling(target_ongoing_requests=2, max_replicas=10), 60, 6)
    now = drive(scaler, 0, 120, 6)
    target = scaler.target(now, current=3)
    assert target.replicas == 3
    assert not target.panic
    assert "6.0 ongoing requests over the last 60s, target 2 per replica" in target.reason


def test_a_burst_scales_up_at_once_in_panic_mode() -> None:
    scaler = Autoscaler(Scaling(target_ongoing_requests=1, max_replicas=8), 60, 6)
    now = drive(scaler, 0, 120, 1)  # a minute of one request at a time
    assert scaler.target(now, current=1).replicas == 1
    now = drive(scaler, now + 0.25, now + 1.0, 8)  # then eight at once, for a second
    target = scaler.target(now, current=1)
    assert target.panic
    assert target.replicas >= 2  # the stable window alone would still say 1
    assert "burst" in target.reason


def test_panic_never_scales_down_until_a_stable_window_has_passed() -> None:
    scaler = Autoscaler(Scaling(target_ongoing_requests=1, max_replicas=8), 10, 2)
    now = drive(scaler, 0, 3, 8)
    peak = scaler.target(now, current=1).replicas
    assert peak == 8
    now = drive(scaler, now + 0.25, now + 5, 1)  # demand falls within the panic
    assert scaler.target(now, current=peak).replicas == peak
    now = drive(scaler, now + 0.25, now + 20, 1)  # a stable window later, calm again
    target = scaler.target(now, current=peak)
    assert not target.panic
    assert target.replicas == 1


def test_scale_to_zero_after_idle_timeout_and_back_on_a_request() -> None:
    scaler = Autoscaler(Scaling(idle_timeout=30, min_replicas=0), 60, 6)
    now = drive(scaler, 0, 5, 1)
    now = drive(scaler, now + 0.25, now + 20, 0)
    assert scaler.target(now, current=1).replicas == 1  # idle for 20s of its 30
    now = drive(scaler, now + 0.25, now + 15, 0)
    target = scaler.target(now, current=1)
    assert target.replicas == 0
    assert "idle_timeout 30s" in target.reason
    scaler.observe(now + 1, 1, requested=True)  # a request waits: at once, one replica
    assert scaler.target(now + 1, current=0).replicas == 1


def test_min_and_max_replicas_bound_the_answer() -> None:
    scaler = Autoscaler(Scaling(min_replicas=2, max_replicas=3, idle_timeout=1), 60, 6)
    assert scaler.target(0, current=0).replicas == 2  # never requested, kept at min
    now = drive(scaler, 0, 30, 50)
    target = scaler.target(now, current=3)
    assert target.replicas == 3
    assert "capped at max_replicas 3" in target.reason


def test_never_requested_model_stays_at_zero() -> None:
    scaler = Autoscaler(Scaling(), 60, 6)
    drive(scaler, 0, 10, 0)
    target = scaler.target(10, current=0)
    assert target.replicas == 0
    assert target.reason == "never requested"


def test_average_is_weighted_by_time() -> None:
    scaler = Autoscaler(Scaling(target_ongoing_requests=1), 10, 2)
    scaler.observe(0, 4)
    scaler.observe(1, 0)  # 4 for one second
    scaler.observe(10, 0)  # then 0 for nine
    assert abs(scaler.average(10, 10) - 0.4) < 1e-9


def test_a_model_back_from_zero_does_not_inherit_an_old_burst() -> None:
    scaling = Scaling(target_ongoing_requests=1, idle_timeout=2, max_replicas=8)
    scaler = Autoscaler(scaling, 30, 2)
    now = drive(scaler, 0, 2, 8)
    assert scaler.target(now, current=1).replicas == 8
    now = drive(scaler, now + 0.25, now + 3, 0)
    assert scaler.target(now, current=8).replicas == 0  # idle: to zero, panic over
    scaler.observe(now + 0.25, 1, requested=True)
    assert scaler.target(now + 0.25, current=0).replicas == 1
