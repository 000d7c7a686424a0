"""Triton's statistics from what the workers say of each answer: per request, and per batch."""

from __future__ import annotations

from omni_runtime.scheduler.stats import ModelStats


def test_a_batch_counts_once_in_batch_stats_and_per_request_in_inference_stats() -> None:
    stats = ModelStats()
    for _ in range(5):
        stats.record(True, 1_000)
    stats.compute.add(1, 10, 100, 1_000)  # a request run alone
    for _ in range(3):  # a batch of three: each request names the whole batch's times
        stats.compute.add(3, 30, 300, 3_000)
    # (the fifth success was streamed: no compute times)
    entry = stats.to_json("@test/m", "2.0")
    inference = entry["inference_stats"]
    assert inference["compute_input"] == {"count": 4, "ns": 10 + 3 * 30}
    assert inference["compute_infer"] == {"count": 4, "ns": 100 + 3 * 300}
    assert inference["compute_output"] == {"count": 4, "ns": 1_000 + 3 * 3_000}
    assert entry["batch_stats"] == [
        {
            "batch_size": 1,
            "compute_input": {"count": 1, "ns": 10},
            "compute_infer": {"count": 1, "ns": 100},
            "compute_output": {"count": 1, "ns": 1_000},
        },
        {
            "batch_size": 3,
            "compute_input": {"count": 1, "ns": 30},
            "compute_infer": {"count": 1, "ns": 300},
            "compute_output": {"count": 1, "ns": 3_000},
        },
    ]
    assert entry["inference_count"] == 5
    assert entry["execution_count"] == 3  # the lone one, the batch, the streamed one


def test_nothing_timed_reports_zeros_and_no_batches() -> None:
    stats = ModelStats()
    stats.record(True, 5)
    entry = stats.to_json("@test/m", "1")
    assert entry["inference_stats"]["compute_infer"] == {"count": 0, "ns": 0}
    assert entry["batch_stats"] == [] and entry["execution_count"] == 1
