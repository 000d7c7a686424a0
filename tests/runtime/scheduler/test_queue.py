"""The per-model queue: interactive before batch, bounded, waiters that leave on time-out."""

from __future__ import annotations

import asyncio

import pytest

from omni_runtime.scheduler import ModelUnavailable, Priority, RequestQueue


def test_interactive_before_batch_each_in_arrival_order() -> None:
    async def run() -> list[str]:
        queue: RequestQueue[str] = RequestQueue(limit=8)
        waiters = {
            "batch-1": queue.push(Priority.BATCH),
            "live-1": queue.push(Priority.INTERACTIVE),
            "batch-2": queue.push(Priority.BATCH),
            "live-2": queue.push(Priority.INTERACTIVE),
        }
        assert len(queue) == 4
        order = []
        while (future := queue.pop()) is not None:
            order.append(next(name for name, f in waiters.items() if f is future))
        assert not queue
        return order

    assert asyncio.run(run()) == ["live-1", "live-2", "batch-1", "batch-2"]


def test_waiters_that_gave_up_leave_the_queue() -> None:
    async def run() -> None:
        queue: RequestQueue[str] = RequestQueue(limit=8)
        gone = queue.push()
        timed_out = queue.push()
        kept = queue.push()
        gone.cancel()
        timed_out.set_exception(ModelUnavailable("waited too long"))
        await asyncio.sleep(0)  # done callbacks run
        assert len(queue) == 1
        assert queue.pop() is kept
        assert queue.pop() is None
        with pytest.raises(ModelUnavailable):
            timed_out.result()

    asyncio.run(run())


def test_fail_all_answers_every_waiter() -> None:
    async def run() -> None:
        queue: RequestQueue[str] = RequestQueue(limit=8)
        waiters = [queue.push(Priority(i % 2)) for i in range(4)]
        queue.fail_all(ModelUnavailable("model 'm' is unavailable: unloaded"))
        assert not queue
        for waiter in waiters:
            with pytest.raises(ModelUnavailable, match="unloaded"):
                waiter.result()

    asyncio.run(run())
