"""Placement and eviction by memory, against a fake clock and a made-up node."""

from __future__ import annotations

import subprocess
import sys

from omni_runtime.scheduler import (
    Blocked,
    ModelView,
    NodeView,
    ParkReplica,
    ReplicaState,
    ReplicaView,
    SchedulerPolicy,
    StartReplica,
    StopReplica,
    WakeReplica,
)
from omni_runtime.scheduler.policy import eviction_cost
from omni_sdk import Scaling

MiB = 1 << 20


def model(
    name: str,
    *replicas: ReplicaView,
    memory: int = 100 * MiB,
    queued: int = 0,
    in_flight: int = 0,
    load_seconds: float = 1.0,
    recent: float = 0.0,
    scaling: Scaling | None = None,
    arrived: int | None = None,
    **extra: object,
) -> ModelView:
    return ModelView(
        name=name,
        scaling=scaling or Scaling(idle_timeout=60),
        host_bytes=memory,
        queued=queued,
        in_flight=in_flight,
        arrived=max(1, queued + in_flight) if arrived is None else arrived,
        load_seconds=load_seconds,
        recent_requests=recent,
        replicas=list(replicas),
        **extra,  # type: ignore[arg-type]
    )


def ready(id: int, memory: int = 100 * MiB, in_flight: int = 0, device: str = "cpu") -> ReplicaView:
    return ReplicaView(id, ReplicaState.READY, in_flight, memory, 0, device)


def decide(policy: SchedulerPolicy, now: float, node: NodeView, *models: ModelView) -> list:
    policy.observe(now, list(models))
    return policy.decide(now, node, list(models))


def test_a_request_for_a_model_with_no_replica_starts_one() -> None:
    decisions = decide(SchedulerPolicy(), 0, NodeView(1 << 30), model("a", queued=1))
    assert decisions == [StartReplica("a", "cpu", decisions[0].reason)]


def test_when_memory_is_short_the_idle_replica_is_evicted_never_the_busy_one() -> None:
    node = NodeView(250 * MiB)
    busy = model("busy", ready(1, in_flight=1), in_flight=1)
    idle = model("idle", ready(2))
    new = model("new", queued=1)
    decisions = decide(SchedulerPolicy(), 0, node, busy, idle, new)
    stops = [d for d in decisions if isinstance(d, StopReplica)]
    assert [(s.model, s.replica, s.cause) for s in stops] == [("idle", 2, "memory")]
    assert "evicted to make room for 'new'" in stops[0].reason
    assert StartReplica("new", "cpu", decisions[-1].reason) == decisions[-1]


def test_cheapest_replica_goes_first() -> None:
    node = NodeView(350 * MiB)  # 300 used: one eviction makes room for 100 more
    slow_to_load = model("slow", ready(1), load_seconds=20.0)
    often_used = model("popular", ready(2), load_seconds=1.0, recent=50)
    cheap = model("cheap", ready(3), load_seconds=0.5)
    policy = SchedulerPolicy()
    decisions = decide(policy, 0, node, slow_to_load, often_used, cheap, model("new", queued=1))
    stops = [(d.model, d.replica) for d in decisions if isinstance(d, StopReplica)]
    assert stops == [("cheap", 3)]
    assert eviction_cost(cheap) < eviction_cost(slow_to_load) < eviction_cost(often_used)


def test_nothing_evictable_blocks_the_model_and_evicts_nothing() -> None:
    node = NodeView(150 * MiB)
    busy = model("busy", ready(1, in_flight=2), in_flight=2)
    decisions = decide(SchedulerPolicy(), 0, node, busy, model("new", queued=3))
    assert not any(isinstance(d, (StopReplica, StartReplica)) for d in decisions)
    (blocked,) = decisions
    assert isinstance(blocked, Blocked)
    assert blocked.model == "new"
    assert "scheduler.host_memory" in blocked.reason


def test_min_replicas_are_never_evicted() -> None:
    node = NodeView(150 * MiB)
    kept = model("kept", ready(1), scaling=Scaling(min_replicas=1))
    decisions = decide(SchedulerPolicy(), 0, node, kept, model("new", queued=1))
    assert [type(d) for d in decisions] == [Blocked]


def test_a_model_with_queued_requests_is_not_evicted() -> None:
    node = NodeView(150 * MiB)
    waiting = model("waiting", ready(1), queued=1)
    decisions = decide(SchedulerPolicy(), 0, node, waiting, model("new", queued=1))
    assert not any(isinstance(d, StopReplica) and d.model == "waiting" for d in decisions)


def test_idle_surplus_replicas_stop_busy_ones_stay() -> None:
    scaling = Scaling(idle_timeout=5, max_replicas=4)
    policy = SchedulerPolicy(stable_window=10, panic_window=2)
    m = model("m", ready(1, in_flight=1), ready(2), ready(3), in_flight=1, scaling=scaling)
    now = 0.0
    for _ in range(60):  # 15 s of one request in flight at a time
        decisions = decide(policy, now, NodeView(1 << 30), m)
        now += 0.25
    stops = sorted(d.replica for d in decisions if isinstance(d, StopReplica))
    assert stops == [2, 3]
    assert all("scale down" in d.reason for d in decisions if isinstance(d, StopReplica))


def test_scale_to_zero_reports_idle_cause() -> None:
    scaling = Scaling(idle_timeout=5)
    policy = SchedulerPolicy(stable_window=10, panic_window=2)
    decide(policy, 0, NodeView(1 << 30), model("m", ready(1), in_flight=1, scaling=scaling))
    quiet = model("m", ready(1), scaling=scaling, arrived=0)
    decisions = decide(policy, 6, NodeView(1 << 30), quiet)
    (stop,) = decisions
    assert isinstance(stop, StopReplica)
    assert stop.cause == "idle"
    assert "idle_timeout 5s" in stop.reason


def test_backoff_delays_a_restart() -> None:
    policy = SchedulerPolicy()
    crashed = model("m", queued=1, not_before=5.0)
    assert decide(policy, 1, NodeView(1 << 30), crashed) == []
    assert isinstance(decide(policy, 6, NodeView(1 << 30), crashed)[0], StartReplica)


def gpu_models(count: int, gpu: int, wake_seconds: float) -> list[ModelView]:
    return [
        model(
            f"m{i}",
            ReplicaView(i, ReplicaState.READY, 0, MiB, gpu, "cuda"),
            device="cuda",
            gpu_bytes=gpu,
            wake_seconds=wake_seconds,
            recent=count - i,  # m3 is the least used
        )
        for i in range(count)
    ]


def test_gpu_budget_is_memory_times_overcommit_and_a_cheap_wake_parks() -> None:
    gpu = 1 << 30
    node = NodeView(64 << 30, {"cuda:0": 4 * gpu})  # gpu_overcommit 4 on a 1 GiB card
    new = model("new", queued=1, device="cuda", gpu_bytes=gpu)
    decisions = decide(SchedulerPolicy(), 0, node, *gpu_models(4, gpu, 0.05), new)
    # The host has room and waking (0.05 s) costs less than a start (1 s): parked, not stopped.
    assert not [d for d in decisions if isinstance(d, StopReplica)]
    (park,) = [d for d in decisions if isinstance(d, ParkReplica)]
    assert park.model == "m3" and "cuda:0" in park.reason
    assert isinstance(decisions[-1], StartReplica)


def test_a_full_host_stops_instead_of_parking() -> None:
    gpu = 1 << 30
    node = NodeView(gpu, {"cuda:0": 4 * gpu})  # no room on the host for 1 GiB more
    new = model("new", queued=1, device="cuda", gpu_bytes=gpu, memory=MiB)
    decisions = decide(SchedulerPolicy(), 0, node, *gpu_models(4, gpu, 0.05), new)
    assert not [d for d in decisions if isinstance(d, ParkReplica)]
    (stop,) = [d for d in decisions if isinstance(d, StopReplica)]
    assert stop.cause == "memory" and stop.model == "m3"
    assert isinstance(decisions[-1], StartReplica)


def test_a_parked_replica_is_woken_before_a_new_one_starts() -> None:
    gpu = 1 << 30
    node = NodeView(64 << 30, {"cuda:0": gpu})
    parked = ReplicaView(7, ReplicaState.PARKED, 0, MiB, gpu, "cuda:0")
    busy = ReplicaView(8, ReplicaState.READY, 0, MiB, gpu, "cuda:0")
    other = model("other", busy, device="cuda", gpu_bytes=gpu, wake_seconds=0.05)
    m = model("m", parked, queued=1, device="cuda", gpu_bytes=gpu, wake_seconds=0.05)
    decisions = decide(SchedulerPolicy(), 0, node, other, m)
    # No room on the 1 GiB card: the idle 'other' makes room, and 'm' is woken, not started.
    assert [type(d) for d in decisions] == [ParkReplica, WakeReplica]
    assert decisions[0].model == "other"
    assert decisions[1] == WakeReplica("m", 7, decisions[1].reason)


def test_an_idle_gpu_replica_is_parked_and_a_cpu_one_stopped() -> None:
    policy = SchedulerPolicy()
    gpu = 1 << 30
    node = NodeView(64 << 30, {"cuda:0": gpu})
    resident = ReplicaView(7, ReplicaState.READY, 0, MiB, gpu, "cuda:0")
    on_gpu = model("g", resident, device="cuda", gpu_bytes=gpu, wake_seconds=0.05, arrived=1)
    on_cpu = model("c", ready(8), arrived=1)
    decide(policy, 0, node, on_gpu, on_cpu)
    on_gpu.arrived = on_cpu.arrived = 0
    assert decide(policy, 30, node, on_gpu, on_cpu) == []  # within idle_timeout (60 s)
    park, stop = decide(policy, 61, node, on_gpu, on_cpu)
    assert park == ParkReplica("g", 7, park.reason, "idle")
    assert stop == StopReplica("c", 8, stop.reason, "idle")


def test_a_parked_replica_stays_until_the_host_needs_its_memory() -> None:
    policy = SchedulerPolicy()
    gpu = 1 << 30
    node = NodeView(gpu + 200 * MiB, {"cuda:0": gpu})
    parked = ReplicaView(7, ReplicaState.PARKED, 0, MiB, gpu, "cuda:0")
    decide(policy, 0, node, model("m", parked, device="cuda", arrived=1))
    quiet = model("m", parked, device="cuda", arrived=0)
    assert decide(policy, 3600, node, quiet) == []  # an hour idle: still a cheap wake away
    # A CPU model needs 300 MiB of host memory: the parked replica is what can go.
    (stop, start) = decide(policy, 3601, node, quiet, model("new", memory=300 * MiB, queued=1))
    assert stop == StopReplica("m", 7, stop.reason, "memory")
    assert start == StartReplica("new", "cpu", start.reason)


def test_unloaded_model_scales_to_zero() -> None:
    m = model("m", ready(1), serving=False)
    (stop,) = decide(SchedulerPolicy(), 0, NodeView(1 << 30), m)
    assert isinstance(stop, StopReplica) and stop.model == "m"


def test_eviction_never_takes_a_model_below_min_replicas_however_many_it_has() -> None:
    node = NodeView(350 * MiB)  # 300 used; 'new' needs 100 more, then 100 again
    kept = model("kept", ready(1), ready(2), ready(3), scaling=Scaling(min_replicas=2))
    new = model("new", queued=2, scaling=Scaling(target_ongoing_requests=1, idle_timeout=60))
    decisions = decide(SchedulerPolicy(), 0, node, kept, new)
    stops = [d for d in decisions if isinstance(d, StopReplica) and d.model == "kept"]
    assert len(stops) == 1  # 3 replicas, min 2: one may go, never two
    assert any(isinstance(d, Blocked) and d.model == "new" for d in decisions)


def test_recently_used_models_that_do_not_fit_together_do_not_evict_each_other() -> None:
    node = NodeView(150 * MiB)
    policy = SchedulerPolicy()
    a = model("a", ready(1))
    b = model("b")  # used a moment ago (arrived), but nothing waits for it now
    b.arrived = 1
    decisions = decide(policy, 0, node, a, b)
    assert decisions == []  # b waits for a request before it may evict a


def test_scale_down_stops_a_starting_replica_before_a_warm_one() -> None:
    scaling = Scaling(idle_timeout=60, max_replicas=4)
    warm = ready(1)
    cold = ReplicaView(2, ReplicaState.STARTING, 0, 100 * MiB)
    policy = SchedulerPolicy(stable_window=10, panic_window=2)
    decisions = decide(policy, 0, NodeView(1 << 30), model("m", warm, cold, scaling=scaling))
    (stop,) = decisions
    assert isinstance(stop, StopReplica)
    assert stop.replica == 2 and stop.cause == "scale_down"


def test_an_unloaded_model_is_not_counted_as_an_idle_eviction() -> None:
    (stop,) = decide(SchedulerPolicy(), 0, NodeView(1 << 30), model("m", ready(1), serving=False))
    assert isinstance(stop, StopReplica) and stop.cause == "unload"


def gpu_replica(id: int, device: str, size: int, in_flight: int = 0) -> ReplicaView:
    return ReplicaView(id, ReplicaState.READY, in_flight, 0, size, device)


def test_a_model_on_any_gpu_goes_where_it_fits_and_least_busy() -> None:
    gib = 1 << 30
    node = NodeView(1 << 40, {"cuda:0": 10 * gib, "cuda:1": 10 * gib})
    one_replica = Scaling(target_ongoing_requests=8, idle_timeout=60)
    busy = model("busy", gpu_replica(1, "cuda:0", 2 * gib, 3), in_flight=3, scaling=one_replica)
    new = model("new", queued=1, device="cuda", gpu_bytes=4 * gib)
    (start,) = [
        d for d in decide(SchedulerPolicy(), 0, node, busy, new) if isinstance(d, StartReplica)
    ]
    assert start.device == "cuda:1"


def test_eviction_happens_on_the_gpu_where_room_is_cheapest() -> None:
    gib = 1 << 30
    node = NodeView(1 << 40, {"cuda:0": 10 * gib, "cuda:1": 10 * gib})
    wake = 0.3  # 8 GiB over PCIe
    dear = model(
        "dear", gpu_replica(1, "cuda:0", 8 * gib), load_seconds=30.0, recent=10, wake_seconds=wake
    )
    cheap = model("cheap", gpu_replica(2, "cuda:1", 8 * gib), load_seconds=0.5, wake_seconds=wake)
    new = model("new", queued=1, device="cuda", gpu_bytes=4 * gib)
    decisions = decide(SchedulerPolicy(), 0, node, dear, cheap, new)
    evicted = [d.model for d in decisions if isinstance(d, StopReplica | ParkReplica)]
    assert evicted == ["cheap"]
    assert [d.device for d in decisions if isinstance(d, StartReplica)] == ["cuda:1"]


def test_the_policy_imports_nothing_of_the_live_runtime() -> None:
    live = ["uvicorn", "grpc", "prometheus_client", "omni_runtime.workers",
            "omni_runtime.isolation", "omni_runtime.scheduler.controller"]  # fmt: skip
    code = (
        "import sys, omni_runtime.scheduler.policy, omni_runtime.scheduler.autoscaler\n"
        f"print([m for m in {live!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_parked_replica_whose_gpu_is_busy_starts_fresh_on_another() -> None:
    gib = 1 << 30
    node = NodeView(64 << 30, {"cuda:0": 10 * gib, "cuda:1": 10 * gib})
    parked = ReplicaView(1, ReplicaState.PARKED, 0, MiB, 8 * gib, "cuda:0")
    busy = ReplicaView(2, ReplicaState.READY, 3, MiB, 8 * gib, "cuda:0")
    a = model("a", parked, queued=1, device="cuda", gpu_bytes=8 * gib, wake_seconds=0.3)
    b = model("b", busy, in_flight=3, device="cuda", gpu_bytes=8 * gib,
              scaling=Scaling(target_ongoing_requests=8))  # fmt: skip
    decisions = decide(SchedulerPolicy(), 0, node, a, b)
    # cuda:0 is held by b's requests in flight; cuda:1 is empty: a starts there at once.
    assert decisions == [StartReplica("a", "cuda:1", decisions[0].reason)]


def test_no_replica_is_woken_and_evicted_in_one_decision() -> None:
    gib = 1 << 30
    node = NodeView(16 * gib, {"cuda:0": 40 * gib})
    parked = ReplicaView(3, ReplicaState.PARKED, 0, 4 * gib, 8 * gib, "cuda:0")
    busy = ReplicaView(4, ReplicaState.READY, 50, 4 * gib, 8 * gib, "cuda:0")
    a = model("a", busy, parked, in_flight=50, device="cuda", gpu_bytes=8 * gib,
              memory=4 * gib, wake_seconds=0.3, scaling=Scaling(max_replicas=2))  # fmt: skip
    b = model("b", queued=1, memory=9 * gib)
    decisions = decide(SchedulerPolicy(), 0, node, a, b)
    # a's burst wakes its parked replica 3 (host memory back to 8 GiB used); b then needs 9 GiB
    # of host memory, and replica 3, being woken, is not there to evict.
    woken = {d.replica for d in decisions if isinstance(d, WakeReplica)}
    stopped = {d.replica for d in decisions if isinstance(d, StopReplica)}
    assert woken == {3} and not woken & stopped, decisions
