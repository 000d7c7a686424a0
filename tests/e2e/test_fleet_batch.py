"""Asynchronous batches across a fleet: real etcd and real runtimes sharing one queue. Any node
answers for any batch; items run on nodes that serve their model; a batch outlives the node
that accepted it, even one killed with SIGKILL while it ran some of its items."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from omni_runtime.fleet.store import EtcdStore
from tests.e2e.runtime import RunningRuntime
from tests.e2e.test_fleet import ECHO, STREAM, node, router
from tests.fleet_etcd import EtcdCluster, requires_etcd

pytestmark = requires_etcd


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster(1) as cluster:
        yield cluster


def member(
    etcd: EtcdCluster, name: str, state: Path, *paths: Path
) -> AbstractContextManager[RunningRuntime]:
    """Node ``name`` of the fleet, with a state directory of its own (as on its own machine:
    it shares nothing with its peers but etcd)."""
    return node(etcd, name, *paths, extra=["--state-dir", str(state / name)])


def submit(url: str, model: str, requests: list[dict[str, Any]]) -> str:
    response = httpx.post(
        f"{url}/ai/run/{model}", params={"queueRequest": "true"}, json={"requests": requests},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["result"]["request_id"])


def wait_done(url: str, model: str, request_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{url}/ai/run/{model}", json={"request_id": request_id}, timeout=30)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["result"]
        if "responses" in result:
            return result
        assert time.monotonic() < deadline, f"not done in {timeout:g}s: {result}"
        time.sleep(0.25)


def wait_known(url: str, model: str, timeout: float = 30) -> None:
    """Until the node knows ``model`` (its own, or from a peer's load report)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/v2/models/{model}", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, f"{url} never learnt of {model}"
        time.sleep(0.25)


def claims(etcd: EtcdCluster, request_id: str) -> dict[int, str]:
    """The batch's items being run now, and by which node (read from etcd)."""

    async def read() -> dict[str, bytes]:
        store = await EtcdStore.connect(etcd.endpoints)
        try:
            return await store.items(f"/omni/batches/{request_id}/running/")
        finally:
            await store.close()

    found = asyncio.run(read())
    return {int(key.rpartition("/")[2]): json.loads(value)["node"] for key, value in found.items()}


def test_any_node_answers_for_a_batch_and_only_nodes_serving_its_model_run_it(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        a = stack.enter_context(member(etcd, "a", tmp_path, ECHO))
        b = stack.enter_context(member(etcd, "b", tmp_path, ECHO, STREAM))
        # submitted to a, polled from b
        echo = submit(a.url, "@test/echo", [{"text": f"t{i}"} for i in range(6)])
        result = wait_done(b.url, "@test/echo", echo)
        assert [r["id"] for r in result["responses"]] == list(range(6))
        assert [r["result"]["text"] for r in result["responses"]] == [f"t{i}" for i in range(6)]
        assert wait_done(a.url, "@test/echo", echo) == result
        listed = httpx.get(f"{b.url}/ai/batch", timeout=10).json()["result"]
        assert [(e["request_id"], e["status"], e["done"]) for e in listed] == [(echo, "done", 6)]
        # an item etcd could not keep is refused, naming it
        big = {"requests": [{"text": "small"}, {"text": "x" * (1 << 20)}]}
        refused = httpx.post(
            f"{a.url}/ai/run/@test/echo", params={"queueRequest": "true"}, json=big, timeout=30
        )
        assert refused.status_code == 413, refused.text
        assert "requests[1]" in refused.json()["errors"][0]["message"]
        # a model only b serves, submitted to a: a never takes its items, b runs them all
        wait_known(a.url, "@test/words")
        words = submit(a.url, "@test/words", [{"prompt": "one two", "max_tokens": 2}] * 4)
        result = wait_done(a.url, "@test/words", words)
        assert all(r["success"] for r in result["responses"]), result
        assert len(result["responses"]) == 4


def test_a_router_takes_batches_for_the_fleet(etcd: EtcdCluster, tmp_path: Path) -> None:
    with ExitStack() as stack:
        stack.enter_context(member(etcd, "a", tmp_path, ECHO))
        r = stack.enter_context(router(etcd))
        wait_known(r.url, "@test/echo")
        request_id = submit(r.url, "@test/echo", [{"text": f"r{i}"} for i in range(4)])
        result = wait_done(r.url, "@test/echo", request_id)
        assert [r["result"]["text"] for r in result["responses"]] == [f"r{i}" for i in range(4)]
        listed = httpx.get(f"{r.url}/ai/batch", timeout=10).json()["result"]
        assert [(e["request_id"], e["status"]) for e in listed] == [(request_id, "done")]


def test_a_batch_outlives_the_node_that_accepted_it(etcd: EtcdCluster, tmp_path: Path) -> None:
    count = 16
    with ExitStack() as stack:
        a = stack.enter_context(member(etcd, "a", tmp_path, ECHO))
        b = stack.enter_context(member(etcd, "b", tmp_path, ECHO))
        request_id = submit(a.url, "@test/slow", [{"seconds": 0.5}] * count)
        deadline = time.monotonic() + 60
        while "a" not in claims(etcd, request_id).values():  # a is running some of it
            assert time.monotonic() < deadline, "node a never claimed an item"
            time.sleep(0.1)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        held = {index for index, name in claims(etcd, request_id).items() if name == "a"}
        assert held  # a died holding them: they come back when its lease expires
        result = wait_done(b.url, "@test/slow", request_id)
        responses = result["responses"]
        assert [r["id"] for r in responses] == list(range(count))  # each exactly once
        assert all(r["success"] for r in responses), [r for r in responses if not r["success"]]
        assert b.process.poll() is None
