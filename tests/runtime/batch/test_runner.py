"""The batch runner on the event loop: a /metrics scrape never waits for the store."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from omni_runtime.batch import BatchRunner, SqliteBatchStore
from omni_runtime.config import ServerSettings
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import Controller
from omni_runtime.scheduler.simulated import Physics, SimulatedWorkers


def test_a_scrape_does_not_wait_for_the_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        metrics = Metrics()
        backend = SimulatedWorkers(Physics(), [], loop.time, [])
        node = Controller([], ServerSettings(), metrics, backend, host_memory=1 << 30)
        store = SqliteBatchStore(tmp_path / "batch.sqlite3")
        runner = BatchRunner(store, node, 3600, metrics)
        runner.start()
        await asyncio.sleep(0.7)  # the loop has counted once, on the store's thread
        assert runner.counts == {"queued": 0, "running": 0, "done": 0, "failed": 0}
        held = threading.Event()
        release = threading.Event()

        def hold_the_store() -> None:  # a long write on the store's thread, say
            with store._lock:
                held.set()
                release.wait(10)

        threading.Thread(target=hold_the_store, daemon=True).start()
        held.wait(5)
        started = time.monotonic()
        text = metrics.render().decode()
        assert time.monotonic() - started < 1.0
        assert 'omni_batch_items{state="queued"} 0.0' in text
        release.set()
        await runner.stop()

    asyncio.run(scenario())
