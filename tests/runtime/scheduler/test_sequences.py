"""A sequence model's requests in the scheduler (``scheduler/sequences.py``), over simulated
workers in virtual time: each sequence stays on one replica, which is not scaled away while
the sequence lives, and ends after its idle timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Any

import pytest

from omni_runtime.scheduler import ModelBusy
from omni_runtime.scheduler.backend import Response
from omni_runtime.scheduler.simulated import SimulatedWorker, SimulatedWorkers
from omni_sdk.sequences import SequenceControls
from omni_sdk.wire import V2_PREFIX, Kind
from tests.runtime.scheduler.test_controller import Node, run, spec


class V2Worker(SimulatedWorker):
    """A simulated worker that reads its request's index from a v2 body's ``id``."""

    def request(self, kind: int, parts: list[bytes], on_chunk: Any = None) -> Any:
        header = json.loads(parts[1])
        self.served_ids.append(header["id"])
        return super().request(kind, [header["id"].encode()], on_chunk)


class V2Workers(SimulatedWorkers):
    def worker(self, spec: Any) -> SimulatedWorker:
        worker = V2Worker(self, spec, next(self._ids))
        worker.served_ids = []  # type: ignore[attr-defined]
        return worker


def sequence_spec(**scaling: Any) -> Any:
    controls = SequenceControls(start="START", idle_timeout=30, max_sequences=2)
    return dataclasses.replace(spec("s", **scaling), sequence=controls)


async def call(node: Node, seconds: float, **parameters: Any) -> Response:
    index = len(node.backend.durations)
    node.backend.durations.append(seconds)
    node.backend.arrivals.append(node.loop.time())
    node.backend.waits.append(math.inf)
    body = json.dumps({"id": str(index), "inputs": [], "parameters": parameters}).encode()
    return await node["s"].sequences.call(  # type: ignore[union-attr]
        Kind.INFER_V2, [V2_PREFIX.pack(len(body)), body], 0, None
    )


def test_a_replica_with_a_live_sequence_is_not_scaled_to_zero() -> None:
    async def scenario() -> None:
        node = Node(sequence_spec(idle_timeout=10), backend=V2Workers)
        await node.controller.start()
        status, _, _ = await call(node, 1.0, sequence_id=1, sequence_start=True)
        assert status == 200
        [replica] = node["s"].replicas
        assert replica.sequences == 1 and replica.view().in_flight == 1
        await asyncio.sleep(20)  # past scaling.idle_timeout, within sequence.idle_timeout
        assert node["s"].replicas == [replica]
        assert (await call(node, 1.0, sequence_id=1, sequence_end=True))[0] == 200
        assert replica.sequences == 0
        await asyncio.sleep(15)  # now it is idle: it goes
        assert node["s"].replicas == []
        await node.controller.stop()

    run(scenario)


def test_sequences_stay_on_their_replica_and_end_when_idle() -> None:
    async def scenario() -> None:
        node = Node(sequence_spec(min_replicas=2, max_replicas=2), backend=V2Workers)
        await node.controller.start()
        while node["s"].ready_replicas < 2:
            await asyncio.sleep(0.5)
        # Two sequences start at once: each takes a free replica.
        first, second = await asyncio.gather(
            call(node, 2.0, sequence_id="a", sequence_start=True),
            call(node, 2.0, sequence_id="b", sequence_start=True),
        )
        assert first[0] == second[0] == 200
        a, b = (node["s"].sequences.live[k].replica for k in ("a", "b"))  # type: ignore[union-attr]
        assert a is not None and b is not None and a is not b
        for _ in range(3):
            await asyncio.gather(call(node, 1.0, sequence_id="a"), call(node, 1.0, sequence_id="b"))
        assert len(a.worker.served_ids) == 4 and len(b.worker.served_ids) == 4  # type: ignore[attr-defined]
        # A third sequence is past max_sequences = 2.
        with pytest.raises(ModelBusy, match=r"sequence\.max_sequences"):
            await call(node, 1.0, sequence_id="c", sequence_start=True)
        await asyncio.sleep(31)  # sequence.idle_timeout
        assert node["s"].sequences.live == {}  # type: ignore[union-attr]
        assert a.sequences == b.sequences == 0
        status, _, body = await call(node, 1.0, sequence_id="a")
        assert status == 400 and b"sequence 'a' is not live" in body
        await node.controller.stop()

    run(scenario)
