"""server/eager.py: a coroutine's first step runs inside the caller, the rest in a Task that
behaves as one of its own would (context, cancellation, results and exceptions)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from omni_runtime.server.eager import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def _run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_first_step_runs_at_once_and_the_rest_in_a_task_of_its_own_context() -> None:
    seen: list[Any] = []

    async def work(answer: asyncio.Future[str]) -> None:
        seen.append("first step")
        VAR.set("inside")
        seen.append(await answer)
        seen.append((VAR.get(), asyncio.current_task() is not None))
        await asyncio.sleep(0)  # a bare turn of the loop, too
        seen.append("after a turn")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()
        task = start_eagerly(loop, work(answer))
        assert seen == ["first step"]  # before start_eagerly returned
        assert VAR.get() == "unset"  # what the coroutine set stays in its own context
        assert task is not None and not task.done()
        answer.set_result("answered")
        await task
        assert seen == ["first step", "answered", ("inside", True), "after a turn"]

    _run(scenario)


def test_a_coroutine_done_within_its_first_step_needs_no_task() -> None:
    done: list[bool] = []

    async def quick() -> None:
        done.append(True)

    async def scenario() -> None:
        assert start_eagerly(asyncio.get_running_loop(), quick()) is None
        assert done == [True]

    _run(scenario)


def test_an_exception_of_the_first_step_is_raised_to_the_caller() -> None:
    async def failing() -> None:
        raise ValueError("at once")

    async def scenario() -> None:
        with pytest.raises(ValueError, match="at once"):
            start_eagerly(asyncio.get_running_loop(), failing())

    _run(scenario)


def test_an_exception_after_the_first_wait_is_the_tasks() -> None:
    async def later(answer: asyncio.Future[str]) -> None:
        await answer

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()
        task = start_eagerly(loop, later(answer))
        assert task is not None
        answer.set_exception(ValueError("later"))
        with pytest.raises(ValueError, match="later"):
            await task

    _run(scenario)


@pytest.mark.parametrize("answered_first", [False, True], ids=["waiting", "answered"])
def test_cancelling_the_task_cancels_the_coroutine_where_it_waits(answered_first: bool) -> None:
    """As with a Task of its own: the future it waits for is cancelled, or, where that is
    already done, the cancellation is thrown into the coroutine at its next step."""
    seen: list[str] = []

    async def waits(answer: asyncio.Future[str]) -> None:
        try:
            await answer
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()
        task = start_eagerly(loop, waits(answer))
        assert task is not None
        await asyncio.sleep(0)  # the task has taken over the wait
        if answered_first:
            answer.set_result("too late")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]
        assert answer.cancelled() is not answered_first

    _run(scenario)
