"""The runtime polls instead of sleeping while a worker's answer is due, and lets one worker
at a time poll where a core is spare (``workers/busy_poll.py``, ``server.busy_poll``).

Real event loops and a real WorkerChannel over a socket pair; whether the loop slept is read
from the timeouts its selector was given."""

from __future__ import annotations

import asyncio
import gc
import selectors
import socket
import weakref
from typing import Any

import pytest

from omni_runtime.config import ServerSettings
from omni_runtime.workers.busy_poll import CROWDED_S, BusyPoll
from omni_runtime.workers.channel import WorkerChannel
from omni_sdk.wire import FLAG_POLL, POLL_NS, FrameReader, Kind, Payloads, encode_frame


class RecordingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The selector of an asyncio loop that keeps the timeout of every select."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def select(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        return super().select(timeout)


def _busy(budget: float = 1.0, spare: int = 1) -> BusyPoll:
    """A BusyPoll that sees ``spare`` cores besides the runtime's, whatever this machine has."""
    poll = BusyPoll(budget=budget)
    poll.spare = spare
    return poll


def _run(main: Any, selector: selectors.BaseSelector | None = None) -> Any:
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_loop_does_not_sleep_while_an_answer_is_owed_and_sleeps_after() -> None:
    selector = RecordingSelector()

    async def main() -> tuple[list[float | None], list[float | None]]:
        loop = asyncio.get_running_loop()
        poll = _busy()
        answer: asyncio.Future[None] = loop.create_future()
        poll.sent(answer, 0)
        await asyncio.sleep(0)
        selector.timeouts.clear()
        loop.call_later(0.05, answer.set_result, None)
        await answer
        owed = list(selector.timeouts)
        selector.timeouts.clear()
        await asyncio.sleep(0.05)  # nothing owed: the loop sleeps through this
        return owed, list(selector.timeouts)

    owed, after = _run(main, selector)
    # While the answer was owed (50 ms) the loop never blocked: many turns, each with timeout 0.
    assert len(owed) > 20 and set(owed) == {0}, owed[:10]
    assert any(t is None or t > 0 for t in after), after


def test_it_polls_for_the_budget_at_most() -> None:
    selector = RecordingSelector()

    async def main() -> tuple[bool, list[float | None]]:
        loop = asyncio.get_running_loop()
        poll = _busy(0.02)
        never: asyncio.Future[None] = loop.create_future()
        poll.sent(never, 0)
        await asyncio.sleep(0.1)
        polling = poll.polling
        never.cancel()
        return polling, list(selector.timeouts)

    polling, timeouts = _run(main, selector)
    assert not polling  # it gave up after 20 ms
    assert any(t is not None and t > 0.05 for t in timeouts)  # and then slept


@pytest.mark.parametrize(("budget", "workers", "spare"), [(0.0, 1, 1), (1.0, 2, 1), (1.0, 1, 0)])
def test_no_budget_or_no_core_for_each_worker_means_no_polling(
    budget: float, workers: int, spare: int
) -> None:
    """A budget of 0; or more workers owing answers than cores beside the loop's (a single
    core: none), where polling would take the CPU a worker needs: the loop sleeps until the
    answers come, and no worker is told to poll."""
    selector = RecordingSelector()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        poll = _busy(budget, spare)
        answers = [loop.create_future() for _ in range(workers)]
        for answer in answers:
            poll.sent(answer, 0)
        assert poll.flags(object()) == 0
        selector.timeouts.clear()
        for answer in answers:
            loop.call_later(0.05, answer.set_result, None)
        await asyncio.gather(*answers)
        return len(selector.timeouts)

    assert _run(main, selector) < 5  # it slept until the answers came


def test_flag_poll_goes_to_one_worker_at_a_time_while_a_core_is_spare() -> None:
    a, b = "a", "b"  # two workers

    async def main() -> None:
        loop = asyncio.get_running_loop()
        poll = _busy(spare=2)
        first: asyncio.Future[None] = loop.create_future()
        assert poll.flags(a) == FLAG_POLL
        poll.sent(first, FLAG_POLL)
        # a will poll once it has answered: no other worker may meanwhile
        second: asyncio.Future[None] = loop.create_future()
        assert poll.flags(b) == 0
        poll.sent(second, 0)
        first.set_result(None)
        await asyncio.sleep(0)
        assert poll.flags(b) == 0  # a is polling now, for up to POLL_NS...
        assert poll.flags(a) == FLAG_POLL  # ...and its own next request keeps it polling
        third: asyncio.Future[None] = loop.create_future()
        poll.sent(third, FLAG_POLL)
        assert poll.owed == 2
        second.set_result(None)
        await asyncio.sleep(POLL_NS / 1e9 + 0.01)
        assert poll.flags(b) == 0  # a owes a flagged answer: it may poll after it
        third.set_result(None)
        await asyncio.sleep(POLL_NS / 1e9 + 0.01)
        assert poll.flags(b) == FLAG_POLL  # a's polling is over

    _run(main)


def test_polling_is_for_one_answer_owed_per_spare_core() -> None:
    """A client that waits on each answer has one owed at a time: the loop and a worker poll.
    A second answer owed (a pipeline, a second client) means requests come faster than
    wake-ups cost: neither the loop nor the worker polls, and the CPU goes to the work."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        poll = _busy()
        assert poll.flags("a") == FLAG_POLL
        poll.sent(loop.create_future(), FLAG_POLL)
        assert poll.polling
        assert poll.flags("a") == 0  # one answer owed already, on the one spare core
        poll.sent(loop.create_future(), 0)
        await asyncio.sleep(0.01)
        assert not poll.polling

    _run(main)


def test_after_more_answers_owed_than_spare_cores_nothing_polls_for_a_while() -> None:
    """Under load (several clients at once) the answers owed fall to one only between waves
    of requests; polling then would take the cores that the next wave needs. So, for
    CROWDED_S after more answers were owed than spare cores, neither the loop nor a worker
    polls, even for a single answer owed; after it, a lone client's requests are polled for
    again."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        poll = _busy()
        answers = [loop.create_future() for _ in range(2)]
        for answer in answers:
            poll.sent(answer, poll.flags("a"))
        answers[0].set_result(None)
        await asyncio.sleep(0)
        assert poll.owed == 1 and not poll.polling  # one owed, but the load was just higher
        answers[1].set_result(None)
        await asyncio.sleep(0)
        assert poll.flags("a") == 0
        single: asyncio.Future[None] = loop.create_future()
        poll.sent(single, 0)
        assert not poll.polling
        single.set_result(None)
        await asyncio.sleep(CROWDED_S + 0.01)
        assert poll.flags("a") == FLAG_POLL  # the crowd is gone: a lone request is polled for
        poll.sent(loop.create_future(), FLAG_POLL)
        assert poll.polling

    _run(main)


def test_another_worker_gets_flag_poll_once_the_polling_one_is_done() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        poll = _busy()
        answer: asyncio.Future[None] = loop.create_future()
        assert poll.flags("a") == FLAG_POLL
        poll.sent(answer, FLAG_POLL)
        answer.set_result(None)
        await asyncio.sleep(0)
        assert poll.flags("b") == 0
        await asyncio.sleep(POLL_NS / 1e9 + 0.01)
        assert poll.flags("b") == FLAG_POLL

    _run(main)


def _channel_flags(
    settings: ServerSettings, count: int, worker_polls: bool = True, spare: int = 1
) -> list[int]:
    """The flags of ``count`` requests sent at once through a WorkerChannel."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        ours, worker = socket.socketpair()
        with worker:
            _, channel = await loop.create_unix_connection(
                lambda: WorkerChannel(
                    "test", Payloads(None), None, settings.busy_poll, worker_polls
                ),
                sock=ours,
            )
            BusyPoll.of(loop, settings.busy_poll).spare = spare
            answers = [channel.request(Kind.RUN_JSON, [b'{"text": "hi"}']) for _ in range(count)]
            await asyncio.sleep(0.01)
            worker.setblocking(False)
            frames = list(FrameReader().feed(worker.recv(1 << 16)))
            for _, _, request_id, _ in frames:
                worker.send(encode_frame(Kind.RESPONSE, request_id, bytes(32)))
            await asyncio.wait_for(asyncio.gather(*answers), 5)
            channel.transport.close()
            return [flags for _, flags, _, _ in frames]

    return _run(main)


def test_the_channel_flags_requests_while_a_core_is_spare_and_busy_poll_0_turns_it_off() -> None:
    assert _channel_flags(ServerSettings(), 3, spare=3) == [FLAG_POLL] * 3
    # one spare core: only the request sent while no other answer was owed
    assert _channel_flags(ServerSettings(), 3) == [FLAG_POLL, 0, 0]
    assert _channel_flags(ServerSettings(), 3, spare=0) == [0, 0, 0]
    assert _channel_flags(ServerSettings(busy_poll=0), 3) == [0, 0, 0]
    # a worker whose CPU quota is under a core is never told to poll
    assert _channel_flags(ServerSettings(), 3, worker_polls=False) == [0, 0, 0]
    assert ServerSettings(busy_poll="300us").busy_poll == 0.0003


def test_it_is_one_per_loop() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert BusyPoll.of(loop, 0.001) is BusyPoll.of(loop, 0.002)
        assert BusyPoll.of(loop, 0.003).budget == 0.003

    _run(main)


def test_a_loop_that_is_gone_takes_its_instance_with_it() -> None:
    loop = asyncio.new_event_loop()
    BusyPoll.of(loop, 0.001)
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None
