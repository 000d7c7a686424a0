"""What a newcomer trips over first: a bad port, a package that fails, a misspelt model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import metric, serve

ECHO = FIXTURES / "packages" / "echo-models"


def test_a_bad_port_is_one_line_and_exit_status_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(ECHO), "--port", "99999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "omni-runtime serve: argument --port: a port is 0 (any free one) to 65535, got 99999 "
        "(see omni-runtime serve --help)"
    ]


def test_the_ready_line_counts_failed_packages_and_a_misspelt_model_is_named(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(
        '[project]\nname = "omni-test-broken"\nversion = "0.1.0"\ndependencies = ["omni-sdk"]\n'
        '[project.entry-points.omni]\nbroken = "omni_test_broken"\n'
    )
    (broken / "omni_test_broken.py").write_text("raise ImportError('this package is broken')\n")
    for path in (tmp_path, broken, *broken.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/ecoh".scaling]\nmax_replicas = 2\n')
    with serve(ECHO, broken, extra=["--config", str(config)]) as runtime:
        ready = runtime.wait_for_line("omni-runtime: serving")
        assert "; 1 package(s) failed, see above" in ready
        warning = runtime.wait_for_line(r'\[models\."@test/ecoh"\] names no model')
        assert str(config) in warning and "@test/echo" in warning and "misspelt" in warning


def test_a_malformed_body_gets_its_400_without_a_cold_start() -> None:
    with serve(ECHO) as runtime, httpx.Client(base_url=runtime.url, timeout=60) as http:
        for body, says in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON an array")):
            response = http.post("/ai/run/@test/echo", content=body)
            assert response.status_code == 400
            error = response.json()["errors"][0]
            assert "model '@test/echo'" in error["message"] and says in error["message"]
        metrics = http.get("/metrics").text
        assert metric(metrics, "omni_model_cold_starts_total", model="@test/echo") == 0
        # A good body still starts the model and is answered.
        assert http.post("/ai/run/@test/echo", json={"text": "hi"}).status_code == 200


def _replicas(metrics: str, model: str) -> float:
    """The model's replicas gauge, which must be there (0 is a value, not an absence)."""
    if not re.search(rf'^omni_model_replicas{{[^}}]*model="{re.escape(model)}"', metrics, re.M):
        raise AssertionError(f"no omni_model_replicas line for {model}")
    return metric(metrics, "omni_model_replicas", model=model)


def test_a_body_the_schema_refuses_gets_its_400_without_a_cold_start() -> None:
    with serve(ECHO) as runtime, httpx.Client(base_url=runtime.url, timeout=60) as http:
        for body, says in (
            ({"count": 2}, "input 'text': Field required"),
            ({"text": "hi", "values": "1, 2"}, "input 'values': expected array, got a string"),
        ):
            started = time.monotonic()
            response = http.post("/ai/run/@test/echo", json=body)
            assert response.status_code == 400, response.text
            assert time.monotonic() - started < 2.0
            metrics = http.get("/metrics").text  # the runtime said so itself: no worker started
            assert metric(metrics, "omni_model_cold_starts_total", model="@test/echo") == 0
            assert _replicas(metrics, "@test/echo") == 0
            message = response.json()["errors"][0]["message"]
            assert message.startswith("model '@test/echo': ") and says in message
        # What pydantic coerces ("3" for an int, 1 for a bool) is not refused: it starts the model.
        answer = http.post("/ai/run/@test/echo", json={"text": "a", "count": "3", "flag": 1})
        assert answer.status_code == 200 and answer.json()["result"]["text"] == "aaa"
        # With a replica ready the worker validates, with its own message.
        response = http.post("/ai/run/@test/echo", json={"count": 2})
        assert response.status_code == 400
        assert "'text'" in response.json()["errors"][0]["message"]


def test_in_a_pipe_discovery_shows_each_package_as_a_log_line() -> None:
    tensors = FIXTURES / "packages" / "tensor-models"
    with serve(ECHO, tensors) as runtime:
        lines = runtime.lines
        ready = next(i for i, line in enumerate(lines) if "omni-runtime: serving" in line)
        for package in ("echo-models", "tensor-models"):
            started = next(i for i, line in enumerate(lines) if f"discovering {package}" in line)
            found = next(i for i, line in enumerate(lines) if f"discovered {package} in" in line)
            assert started < found < ready
        echo = next(line for line in lines if "discovered echo-models in" in line)
        assert re.search(r"discovered echo-models in \d+\.\ds: \d+ models \(.*@test/echo", echo)
        assert "\r" not in "".join(lines) and "\x1b" not in "".join(lines)  # no terminal codes


def _omni_cgroups(pid: int) -> list[Path]:
    """The cgroup directories runtime ``pid`` made, in every hierarchy this process is in."""
    root = Path("/sys/fs/cgroup")
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        hierarchies = [root] if controllers == "" else [root / c for c in controllers.split(",")]
        for hierarchy in hierarchies:
            found.extend(p for p in [hierarchy / own.lstrip("/") / f"omni-{pid}"] if p.exists())
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_serve_leaves_no_cgroup_behind(sig: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: the runtime makes no cgroups")
    with serve(ECHO) as runtime, httpx.Client(base_url=runtime.url, timeout=60) as http:
        assert http.post("/ai/run/@test/echo", json={"text": "hi"}).status_code == 200
        pid = runtime.process.pid
        made = _omni_cgroups(pid)
        runtime.stop(sig)
    if not made:
        pytest.skip("the runtime found no usable cgroup hierarchy here")
    assert _omni_cgroups(pid) == []
    assert not [line for line in runtime.lines if "could not remove cgroup" in line]
