"""A model's statistics as Triton's statistics extension reports them (``/v2/models/{name}/stats``,
gRPC ``ModelStatistics``).

``ModelStats`` counts what the runtime sees of each request (``ModelHandle.call``): its
outcome, its time in the model's queue. ``ComputeStats`` adds what the model's workers say of
each answer they ran: how long decoding its inputs, running the engine and encoding its outputs
took, and how many requests ran together (the worker's RESPONSE frame carries them,
``omni_sdk.wire.RESPONSE_PREFIX``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ComputeStats", "ModelStats"]


class ComputeStats:
    """Where a model's successful requests spent their time in its workers: overall, per
    request (each request of a batch counts the whole batch's times, as Triton counts them),
    and by batch size, per batch run. Adding is a few integer additions (it runs for every
    answer); the totals are summed when read."""

    __slots__ = ("_batches",)

    def __init__(self) -> None:
        # batch size -> [requests, input ns, infer ns, output ns], summed over the requests
        self._batches: dict[int, list[int]] = {}

    def add(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One answered request that ran in a batch of ``batch_size`` requests (1: alone)."""
        row = self._batches.get(batch_size)
        if row is None:
            row = self._batches[batch_size] = [0, 0, 0, 0]
        row[0] += 1
        row[1] += input_ns
        row[2] += infer_ns
        row[3] += output_ns

    def totals(self) -> tuple[int, int, int, int]:
        """Requests, and their input, infer and output nanoseconds."""
        rows = list(self._batches.values())
        return (
            sum(r[0] for r in rows),
            sum(r[1] for r in rows),
            sum(r[2] for r in rows),
            sum(r[3] for r in rows),
        )

    @property
    def executions(self) -> int:
        """Batches run (a request run alone is a batch of one)."""
        return sum(row[0] // size for size, row in self._batches.items())

    def batch_stats(self) -> list[dict[str, Any]]:
        """Triton's ``batch_stats``: per batch size, the batches run and their compute times
        (each batch once: its requests each carried the whole batch's times)."""
        result = []
        for size, (requests, input_ns, infer_ns, output_ns) in sorted(self._batches.items()):
            runs = requests // size
            if not runs:
                continue
            result.append(
                {
                    "batch_size": size,
                    "compute_input": {"count": runs, "ns": input_ns // size},
                    "compute_infer": {"count": runs, "ns": infer_ns // size},
                    "compute_output": {"count": runs, "ns": output_ns // size},
                }
            )
        return result


@dataclass
class ModelStats:
    """Counters for ``/v2/models/{name}/stats`` (Triton's statistics extension)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    server_errors: int = 0  # answers of 500 and above: what a rollout's watch counts
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))  # seconds
    compute: ComputeStats = field(default_factory=ComputeStats)

    def record(self, ok: bool, elapsed_ns: int) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's ``model_stats``. ``execution_count`` is the batches run; a
        success whose worker named no batch (a stream, an answer from another node) counts as
        one."""
        compute = self.compute
        timed, input_ns, infer_ns, output_ns = compute.totals()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success_count,
            "execution_count": max(0, self.success_count - timed) + compute.executions,
            "inference_stats": {
                "success": {"count": self.success_count, "ns": self.success_ns},
                "fail": {"count": self.fail_count, "ns": self.fail_ns},
                "queue": {"count": self.queue_count, "ns": self.queue_ns},
                "compute_input": {"count": timed, "ns": input_ns},
                "compute_infer": {"count": timed, "ns": infer_ns},
                "compute_output": {"count": timed, "ns": output_ns},
            },
            "batch_stats": compute.batch_stats(),
        }
