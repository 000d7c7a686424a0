"""The scheduler with the real runtime: scale to zero and back, bursts, eviction, admission."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, metric, serve

PACKAGES = FIXTURES / "packages"
SCALING = PACKAGES / "scaling-models"
FAST_WINDOWS = '[scheduler]\nstable_window = "2s"\npanic_window = "1s"\n'


def wait_until(check: object, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened within {timeout:.0f}s: {what}")


@contextmanager
def runtime_with(
    tmp_path: Path, config: str, *packages: Path
) -> Iterator[tuple[RunningRuntime, httpx.Client]]:
    path = tmp_path / "omni.toml"
    path.write_text(config)
    with (
        serve(*(packages or (SCALING,)), extra=["--config", str(path)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=120) as http,
    ):
        yield runtime, http


def test_a_model_goes_to_zero_when_idle_and_comes_back_on_the_next_request(
    tmp_path: Path,
) -> None:
    config = FAST_WINDOWS + '[models."@scale/sleepy".scaling]\nidle_timeout = "1s"\n'
    with runtime_with(tmp_path, config) as (runtime, http):
        sleepy = "@scale/sleepy"
        # Nothing runs before the first request, and the model still says it is ready.
        assert metric(http.get("/metrics").text, "omni_model_replicas", model=sleepy) == 0
        assert http.get(f"/v2/models/{sleepy}/ready").status_code == 200
        index = {m["name"]: m for m in http.post("/v2/repository/index", json={}).json()}
        assert index[sleepy]["state"] == "READY"
        assert index[sleepy]["replicas"] == 0
        assert "scaled to zero" in index[sleepy]["reason"]

        first = http.post(f"/ai/run/{sleepy}", json={"seconds": 0})
        assert first.status_code == 200
        mark = len(runtime.lines)
        runtime.wait_for_line(rf"model '{re.escape(sleepy)}': stopped replica \d+", start=mark)
        text = http.get("/metrics").text
        assert metric(text, "omni_model_replicas", model=sleepy) == 0
        assert metric(text, "omni_model_evictions_total", model=sleepy, reason="idle") == 1

        again = http.post(f"/ai/run/{sleepy}", json={"seconds": 0})
        assert again.status_code == 200
        assert again.json()["result"]["pid"] != first.json()["result"]["pid"]
        text = http.get("/metrics").text
        assert metric(text, "omni_model_cold_starts_total", model=sleepy) == 2
        for phase in ("env", "spawn", "import", "load", "first_response"):
            count = metric(text, "omni_cold_start_seconds_count", model=sleepy, phase=phase)
            assert count == 2, phase
        runtime.wait_for_line(r"cold start of replica \d+ took .*first response", start=mark)


def test_a_burst_raises_replicas_and_they_fall_back_after(tmp_path: Path) -> None:
    config = FAST_WINDOWS + '[models."@scale/sleepy".scaling]\nidle_timeout = "2s"\n'
    with (
        runtime_with(tmp_path, config) as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        url = f"{runtime.url}/ai/run/@scale/sleepy"
        burst = [pool.submit(httpx.post, url, json={"seconds": 2.0}, timeout=60) for _ in range(8)]
        responses = [f.result() for f in burst]
        assert {r.status_code for r in responses} == {200}
        pids = {r.json()["result"]["pid"] for r in responses}
        assert len(pids) >= 2, "the burst was served by one replica"
        assert any(re.search(r"starting replica \d+ \(burst", line) for line in runtime.lines)
        # Answers leave as they finish: the first of them did not wait for the last.
        finished = sorted(r.json()["result"]["finished"] for r in responses)
        assert finished[0] < finished[-1] - 1.0

        def back_to_zero() -> bool:
            text = http.get("/metrics").text
            return metric(text, "omni_model_replicas", model="@scale/sleepy") == 0

        wait_until(back_to_zero, 30, "the replicas fell back to zero")


def test_a_sync_engine_answers_each_request_as_it_finishes(tmp_path: Path) -> None:
    config = '[models."@scale/sleepy".scaling]\nmax_replicas = 1\n'
    with (
        runtime_with(tmp_path, config) as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        url = f"{runtime.url}/ai/run/@scale/sleepy"
        assert http.post(url, json={"seconds": 0}).status_code == 200  # started

        def timed(seconds: float) -> tuple[float, dict[str, float]]:
            response = httpx.post(url, json={"seconds": seconds}, timeout=60)
            return time.time(), response.json()["result"]

        first = pool.submit(timed, 1.5)
        time.sleep(0.2)
        second = pool.submit(timed, 1.5)
        received_first, result_first = first.result()
        _, result_second = second.result()
        assert result_first["pid"] == result_second["pid"]  # one replica, one at a time
        assert result_second["started"] >= result_first["finished"] - 0.01
        # The first answer reached the client while the second request was still running.
        assert received_first < result_second["finished"]


def test_eviction_makes_room_by_evicting_the_idle_model_never_the_busy_one(
    tmp_path: Path,
) -> None:
    # Each ballast replica holds about 230 MiB once loaded and reserves 320 MiB while it
    # starts: two fit in 700 MiB, a third only after one goes.
    config = '[scheduler]\nhost_memory = "700MiB"\n'
    with (
        runtime_with(tmp_path, config) as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        a, b, c = "@scale/ballast-a", "@scale/ballast-b", "@scale/ballast-c"
        assert http.post(f"/ai/run/{b}", json={}).status_code == 200
        busy = pool.submit(httpx.post, f"{runtime.url}/ai/run/{a}", json={"seconds": 4}, timeout=60)
        wait_until(
            lambda: any(f"model '{a}' ready" in line for line in runtime.lines), 60, "a ready"
        )
        mark = len(runtime.lines)
        response = http.post(f"/ai/run/{c}", json={})
        assert response.status_code == 200, response.text
        evicted = runtime.wait_for_line(r"stopped replica .*evicted to make room", start=mark)
        assert f"model '{b}'" in evicted and f"for '{c}'" in evicted
        assert busy.result().status_code == 200  # the busy one was never touched
        text = http.get("/metrics").text
        assert metric(text, "omni_model_evictions_total", model=b, reason="memory") == 1
        assert metric(text, "omni_model_evictions_total", model=a, reason="memory") == 0
        assert metric(text, "omni_model_replicas", model=a) == 1


def test_a_full_queue_is_429_and_a_request_that_waited_its_full_time_is_503(
    tmp_path: Path,
) -> None:
    config = (
        '[server]\nload_timeout = "2s"\n'
        '[models."@scale/sleepy".scaling]\nmax_replicas = 1\nmax_queue_size = 2\n'
    )
    with (
        runtime_with(tmp_path, config) as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(3) as pool,
    ):
        url = f"{runtime.url}/ai/run/@scale/sleepy"
        assert http.post(url, json={"seconds": 0}).status_code == 200
        mark = len(runtime.lines)
        running = pool.submit(httpx.post, url, json={"seconds": 5}, timeout=60)
        runtime.wait_for_line(r"sleepy request started \(5", start=mark)
        queued = [pool.submit(httpx.post, url, json={"seconds": 0}, timeout=60) for _ in range(2)]
        wait_until(lambda: _queue_depth(http) == 2, 10, "two requests queued")
        full = http.post(url, json={"seconds": 0})
        assert full.status_code == 429
        assert full.json()["errors"][0]["code"] == 3040
        assert "scaling.max_queue_size" in full.json()["errors"][0]["message"]
        for waited in (f.result() for f in queued):
            assert waited.status_code == 503
            assert waited.headers["retry-after"]
            message = waited.json()["errors"][0]["message"]
            assert "within 2s (server.load_timeout)" in message
        assert running.result().status_code == 200


def _queue_depth(http: httpx.Client) -> float:
    return metric(http.get("/metrics").text, "omni_model_queue_depth", model="@scale/sleepy")


def test_an_unload_does_not_wait_for_a_slow_load(tmp_path: Path) -> None:
    with (
        runtime_with(tmp_path, "") as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        model = "@scale/slow-load"
        waiting = pool.submit(httpx.post, f"{runtime.url}/ai/run/{model}", json={}, timeout=120)
        runtime.wait_for_line(rf"model '{re.escape(model)}': starting replica")
        started = time.monotonic()
        assert http.post(f"/v2/repository/models/{model}/unload").status_code == 200
        assert time.monotonic() - started < 30  # its load alone takes 60s
        response = waiting.result()
        assert response.status_code == 503
        assert "unloaded" in response.json()["errors"][0]["message"]
        assert http.get(f"/v2/models/{model}/ready").status_code == 400

        # The same when the load came from an operator.
        mark = len(runtime.lines)
        loading = pool.submit(httpx.post, f"{runtime.url}/v2/repository/models/{model}/load")
        runtime.wait_for_line(rf"model '{re.escape(model)}': starting replica", start=mark)
        started = time.monotonic()
        assert http.post(f"/v2/repository/models/{model}/unload").status_code == 200
        assert time.monotonic() - started < 30
        refused = loading.result()
        assert refused.status_code == 400
        assert "was unloaded while it loaded" in refused.json()["error"]


def test_a_slow_load_is_not_taken_for_a_hung_worker(tmp_path: Path) -> None:
    with runtime_with(tmp_path, '[server]\nheartbeat_timeout = "1s"\n') as (runtime, http):
        response = http.post("/ai/run/@scale/load-3s", json={})
        assert response.status_code == 200, response.text
        assert not any("has not answered" in line for line in runtime.lines)


def test_shutdown_past_drain_timeout_answers_503_in_the_envelope(tmp_path: Path) -> None:
    config = '[server]\ndrain_timeout = "1s"\n'
    with (
        runtime_with(tmp_path, config) as (runtime, http),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        url = f"{runtime.url}/ai/run/@scale/sleepy"
        assert http.post(url, json={"seconds": 0}).status_code == 200
        slow = pool.submit(httpx.post, url, json={"seconds": 30}, timeout=60)
        wait_until(lambda: metric(http.get("/metrics").text, "omni_model_replicas",
                                  model="@scale/sleepy") == 1, 10, "a replica")  # fmt: skip
        time.sleep(0.5)
        runtime.stop(signal.SIGTERM)
        response = slow.result()
        assert response.status_code == 503
        body = response.json()
        assert body["success"] is False
        assert body["errors"][0]["code"] == 3042
        assert "the runtime is stopping" in body["errors"][0]["message"]


def _serve_fails(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "omni.toml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(SCALING), "--port", "0",
         "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_contradictory_scaling_stops_serve_naming_the_file_and_both_fields(
    tmp_path: Path,
) -> None:
    result = _serve_fails(
        tmp_path, '[models."@scale/sleepy".scaling]\nmin_replicas = 5\nmax_replicas = 2\n'
    )
    assert result.returncode == 2
    assert str(tmp_path / "omni.toml") in result.stderr
    assert "scaling.min_replicas (5" in result.stderr
    assert "scaling.max_replicas (2" in result.stderr

    result = _serve_fails(tmp_path, '[models."@scale/sleepy".scaling]\nidle_timeout = "0s"\n')
    assert result.returncode == 2
    assert "idle_timeout" in result.stderr and str(tmp_path / "omni.toml") in result.stderr

    result = _serve_fails(
        tmp_path,
        '[scheduler]\nhost_memory = "1GiB"\n[models."@scale/sleepy".resources]\nmemory = "2GiB"\n',
    )
    assert result.returncode == 2
    assert "resources.memory (2 GiB" in result.stderr
    assert "scheduler.host_memory" in result.stderr

    result = _serve_fails(tmp_path, '[scheduler]\nstable_window = "5s"\npanic_window = "10s"\n')
    assert result.returncode == 2
    assert "panic_window" in result.stderr and "stable_window" in result.stderr


def test_scheduler_settings_from_two_files_are_checked_together(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "omni.toml").write_text('[scheduler]\nstable_window = "10s"\n')
    package = repository / "scaling-models"
    package.symlink_to(SCALING, target_is_directory=True)
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[scheduler]\npanic_window = "20s"\nstable_window = "30s"\n')
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(repository), "--port", "0",
         "--config", str(explicit)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert str(explicit) in result.stderr and str(repository / "omni.toml") in result.stderr
    assert "panic_window (20s) must not be longer than stable_window (10s)" in result.stderr


def test_min_replicas_that_cannot_all_fit_stop_serve(tmp_path: Path) -> None:
    result = _serve_fails(
        tmp_path,
        '[scheduler]\nhost_memory = "800MiB"\n'
        '[models."@scale/ballast-a".scaling]\nmin_replicas = 2\n'
        '[models."@scale/ballast-b".scaling]\nmin_replicas = 1\n',
    )
    assert result.returncode == 2
    assert "'@scale/ballast-a' 2 × 320 MiB" in result.stderr
    assert "scheduler.host_memory" in result.stderr
