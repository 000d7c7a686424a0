"""The handle the front ends hold (``ModelHandle``): every request is counted once, by it,
whatever way it ends; the directory hands out one handle per model."""

from __future__ import annotations

import asyncio

import pytest

from omni_runtime.scheduler import ModelBusy, ModelDirectory, ModelHandle
from omni_sdk.wire import Kind
from tests.runtime.scheduler.test_controller import Node, run, spec


def counted(node: Node, name: str, status: int) -> float:
    return node.count("omni_requests_total", model=name, status=str(status))


def test_a_call_is_counted_once_in_statistics_and_metrics() -> None:
    async def scenario() -> None:
        node = Node(spec("a"))
        await node.controller.start()
        handle = ModelDirectory(node.controller).get("a")
        assert handle is not None
        node.backend.durations.append(0.25)
        node.backend.arrivals.append(0.0)
        node.backend.waits.append(0.0)
        status, _, _ = await handle.call(Kind.RUN_JSON, [b"0"])
        assert status == 200
        assert handle.stats.success_count == 1 and handle.stats.fail_count == 0
        assert counted(node, "a", 200) == 1
        await node.controller.stop()

    run(scenario)


def test_a_refused_and_an_abandoned_call_are_counted_with_their_status() -> None:
    async def scenario() -> None:
        node = Node(spec("a"))
        await node.controller.start()
        handle = ModelHandle(node["a"])
        # No replica is ready and the request asked not to wait: 429.
        with pytest.raises(ModelBusy):
            await handle.call(Kind.RUN_JSON, [b"0"], reject_if_busy=True)
        assert counted(node, "a", 429) == 1
        # A caller that goes away while it waits for the cold start: 499.
        node.backend.durations.append(10.0)
        node.backend.arrivals.append(0.0)
        node.backend.waits.append(0.0)
        task = asyncio.ensure_future(handle.call(Kind.RUN_JSON, [b"0"]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert counted(node, "a", 499) == 1
        assert handle.stats.fail_count == 2 and handle.stats.success_count == 0
        # An answer decided before any call (a body too large) goes through account().
        handle.account(413, 0.0)
        assert counted(node, "a", 413) == 1
        await node.controller.stop()

    run(scenario)


def test_the_directory_gives_one_handle_per_model_and_none_for_an_unknown_name() -> None:
    async def scenario() -> None:
        node = Node(spec("a"), spec("@cf/b/c"))
        directory = ModelDirectory(node.controller)
        assert directory.get("a") is directory.get("a")
        assert directory.get("nope") is None
        assert directory.names() == ["@cf/b/c", "a"]
        assert [h.name for h in directory] == ["a", "@cf/b/c"]
        assert "a" in directory and "nope" not in directory

    run(scenario)
