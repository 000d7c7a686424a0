"""One model's crash or memory blow-up costs only that model (as root, with cgroups)."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, metric, serve

PACKAGES = FIXTURES / "packages"
needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0
    or not (
        Path("/sys/fs/cgroup/cgroup.controllers").exists() or Path("/sys/fs/cgroup/memory").is_dir()
    ),
    reason="memory limits need root and cgroups",
)


@pytest.fixture(scope="module")
def runtime() -> Iterator[RunningRuntime]:
    with serve(PACKAGES / "echo-models", PACKAGES / "hog-model") as running:
        yield running


@needs_cgroups
def test_a_model_past_its_memory_limit_is_killed_alone(runtime: RunningRuntime) -> None:
    with httpx.Client(base_url=runtime.url, timeout=60) as http:
        assert http.post("/ai/run/@test/hog", json={"mib": 16}).status_code == 200
        echo_pid = http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"]
        mark = len(runtime.lines)
        response = http.post("/ai/run/@test/hog", json={"mib": 600})
        assert response.status_code == 503
        message = response.json()["errors"][0]["message"]
        assert "model '@test/hog'" in message
        assert "exceeded its memory limit of 256 MiB" in message
        runtime.wait_for_line(r"@test/hog.*exceeded its memory limit of 256 MiB", start=mark)
        # The other model never noticed.
        again = http.post("/ai/run/@test/echo", json={"text": "x"}).json()["result"]["pid"]
        assert again == echo_pid
        runtime.wait_for_line(r"model '@test/hog' ready", start=mark)
        assert http.post("/ai/run/@test/hog", json={"mib": 16}).status_code == 200
        metrics = http.get("/metrics").text
        assert metric(metrics, "omni_model_evictions_total", model="@test/hog", reason="oom") >= 1


def test_kill_9_during_load_costs_the_other_models_nothing(runtime: RunningRuntime) -> None:
    stop = threading.Event()
    outcomes: dict[str, Counter[int]] = {"@test/echo": Counter(), "@test/batch": Counter()}
    bodies = {"@test/echo": {"text": "x"}, "@test/batch": {"text": "y"}}

    def load(model: str) -> None:
        with httpx.Client(base_url=runtime.url, timeout=60) as http:
            for _ in range(20_000):  # bounded, whatever happens
                if stop.is_set():
                    return
                outcomes[model][http.post(f"/ai/run/{model}", json=bodies[model]).status_code] += 1

    threads = [threading.Thread(target=load, args=(m,)) for m in outcomes for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=runtime.url, timeout=60) as http:
            pid = http.post("/ai/run/@test/hog", json={"mib": 1}).json()["result"]["pid"]
            mark = len(runtime.lines)
            os.kill(pid, signal.SIGKILL)
            runtime.wait_for_line(r"'@test/hog': worker pid \d+ was killed by SIGKILL", start=mark)
            runtime.wait_for_line(r"model '@test/hog' ready", start=mark)
            after = http.post("/ai/run/@test/hog", json={"mib": 1})
            assert after.status_code == 200
            assert after.json()["result"]["pid"] != pid
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    for model, counts in outcomes.items():
        assert set(counts) == {200}, f"{model} saw {dict(counts)}"
        assert counts[200] > 0


def test_a_worker_that_stops_answering_is_replaced(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text('[server]\nheartbeat_timeout = "1s"\n')
    with (
        serve(PACKAGES / "echo-models", extra=["--config", str(config)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        mark = len(runtime.lines)
        response = http.post("/ai/run/@test/slow", json={"seconds": 600})
        assert response.status_code == 503
        message = response.json()["errors"][0]["message"]
        assert "stopped answering for" in message and "heartbeat_timeout" in message
        runtime.wait_for_line(r"model '@test/slow' ready", start=mark)
        assert http.post("/ai/run/@test/slow", json={"seconds": 0}).status_code == 200
        assert http.post("/ai/run/@test/echo", json={"text": "x"}).status_code == 200
        metrics = http.get("/metrics").text
        assert metric(metrics, "omni_model_evictions_total", model="@test/slow", reason="hung") == 1
