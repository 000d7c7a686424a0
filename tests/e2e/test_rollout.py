"""Rolling out a new version of a model under constant load: no failed request, no answer of
the new version before the switch, a canary's share, an automatic rollback, a version that
does not load never getting traffic. Each version is a package the test writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.runtime import RunningRuntime, metric, serve

ENGINE = """
import asyncio
from pydantic import BaseModel
from omni_sdk import Engine, LoadContext, hookimpl

VERSION = {version!r}
FAIL_INFER = {fail_infer!r}
FAIL_LOAD = {fail_load!r}


class Request(BaseModel):
    text: str


class Answer(BaseModel):
    text: str
    version: str


class Rolled(Engine):
    name = "@test/rolled"

    def load(self, ctx: LoadContext) -> None:
        if FAIL_LOAD:
            raise RuntimeError("this version cannot load")

    def infer(self, request: Request) -> Answer:
        if FAIL_INFER:
            raise ValueError("this version is broken")
        return Answer(text=request.text, version=VERSION)


class RolledAsync(Engine):
    name = "@test/rolled-async"

    async def infer(self, request: Request) -> Answer:
        await asyncio.sleep(0)
        if FAIL_INFER:
            raise ValueError("this version is broken")
        return Answer(text=request.text, version=VERSION)


@hookimpl
def register_engines(register):
    register(Rolled)
    register(RolledAsync)
"""


def package(root: Path, version: str, fail_infer: bool = False, fail_load: bool = False) -> Path:
    directory = root / f"rolled-{version}"
    directory.mkdir()
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "omni-test-rolled"\nversion = "{version}"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\nrolled = "rolled_model"\n'
    )
    (directory / "rolled_model.py").write_text(
        ENGINE.format(version=version, fail_infer=fail_infer, fail_load=fail_load)
    )
    return directory


class Load:
    """Clients sending requests to a model until stopped; every answer's status and version."""

    def __init__(self, url: str, model: str, clients: int = 3) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[int, str, float]] = []  # status, version, when
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                answer = client.post(f"/ai/run/{self.model}", json={"text": "x"})
                version = answer.headers.get("omni-model-version", "")
                if answer.status_code == 200:
                    assert answer.json()["result"]["version"] == version
                self.answers.append((answer.status_code, version, time.monotonic()))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[RunningRuntime, Path]]:
    config = tmp_path / "omni.toml"  # a replica kept warm: there is something to replace
    config.write_text(
        '[models."@test/rolled".scaling]\nmin_replicas = 1\n'
        '[models."@test/rolled-async".scaling]\nmin_replicas = 1\n'
    )
    v1 = package(tmp_path, "1.0.0")
    extra = ["--shared-env", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    with serve(v1, extra=extra) as running:
        yield running, tmp_path


def rollout(url: str, model: str, body: dict[str, object], timeout: float = 60) -> dict:
    with httpx.Client(base_url=url, timeout=30) as client:
        path = f"/v2/repository/models/{model}/rollout"
        started = client.post(path, json=body)
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + timeout
        state = started.json()
        while state["state"] not in ("promoted", "rolled_back", "failed", "aborted"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
            state = client.get(path).json()
        return state


@pytest.mark.parametrize("model", ["@test/rolled", "@test/rolled-async"])
def test_a_rollout_under_load_fails_no_request(
    runtime: tuple[RunningRuntime, Path], model: str
) -> None:
    running, root = runtime
    v2 = package(root, "2.0.0")
    with Load(running.url, model) as load:
        time.sleep(1.0)
        switched = time.monotonic()
        state = rollout(running.url, model, {"package": str(v2)})
        time.sleep(1.0)
    assert state["state"] == "promoted", state
    assert state["from_version"] == "1.0.0" and state["to_version"] == "2.0.0"
    statuses = Counter(status for status, _, _ in load.answers)
    assert set(statuses) == {200}, statuses
    versions = [version for _, version, _ in load.answers]
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    # no answer of the new version before the rollout started
    assert all(v == "1.0.0" for _, v, at in load.answers if at < switched)
    described = httpx.get(f"{running.url}/v2/models/{model}").json()
    assert described["versions"] == ["2.0.0"]
    metrics = httpx.get(f"{running.url}/metrics").text
    assert f'omni_rollouts_total{{model="{model}",outcome="promoted"}} 1.0' in metrics
    # Each version counted under the model's own name, told apart by its version label.
    served = Counter(version for _, version, _ in load.answers)
    for version in ("1.0.0", "2.0.0"):
        counted = metric(metrics, "omni_requests_total", model=model, version=version)
        assert counted == served[version], (version, counted, served)
        timed = metric(metrics, "omni_request_duration_seconds_count", model=model, version=version)
        assert timed == served[version]
    assert f'model="{model}@' not in metrics
    assert metric(metrics, "omni_model_replicas", model=model, version="2.0.0") >= 1


def test_a_canary_gets_its_share_and_a_broken_one_goes_back_by_itself(
    runtime: tuple[RunningRuntime, Path],
) -> None:
    running, root = runtime
    good, broken = package(root, "2.0.0"), package(root, "3.0.0", fail_infer=True)
    with Load(running.url, "@test/rolled") as load:
        time.sleep(0.5)
        state = rollout(
            running.url, "@test/rolled", {"package": str(good), "canary_percent": 20, "watch": "3s"}
        )
        canary = [v for _, v, _ in load.answers]
    assert state["state"] == "promoted", state
    assert [h["state"] for h in state["history"]] == ["loading", "canary", "promoted"]
    during = Counter(canary[len(canary) // 4 : len(canary) * 3 // 4])  # inside the window
    share = during["2.0.0"] / max(1, sum(during.values()))
    assert 0.1 <= share <= 0.35, during
    with Load(running.url, "@test/rolled") as load:
        time.sleep(0.5)
        state = rollout(
            running.url, "@test/rolled",
            {"package": str(broken), "canary_percent": 20, "watch": "20s"},
        )  # fmt: skip
        time.sleep(0.5)
    assert state["state"] == "rolled_back", state
    assert "3.0.0" in state["reason"] and "error" in state["reason"]
    failed = [a for a in load.answers if a[0] != 200]
    assert failed and all(version == "3.0.0" for _, version, _ in failed)
    assert len(failed) <= 0.35 * len(load.answers) + 5  # bounded by the canary's share
    assert load.answers[-1][:2] == (200, "2.0.0")  # the current version serves again


def test_a_version_that_does_not_load_never_gets_traffic(
    runtime: tuple[RunningRuntime, Path],
) -> None:
    running, root = runtime
    unloadable = package(root, "2.0.0", fail_load=True)
    with Load(running.url, "@test/rolled") as load:
        state = rollout(running.url, "@test/rolled", {"package": str(unloadable)}, timeout=120)
        time.sleep(0.5)
    assert state["state"] == "failed", state
    assert "did not start" in state["reason"]
    assert {(status, version) for status, version, _ in load.answers} == {(200, "1.0.0")}


def test_bad_rollouts_are_refused_naming_why_and_change_nothing(
    runtime: tuple[RunningRuntime, Path],
) -> None:
    running, root = runtime
    path = "/v2/repository/models/{}/rollout"
    with httpx.Client(base_url=running.url, timeout=60) as client:
        same = client.post(
            path.format("@test/rolled"), json={"package": str(root / "rolled-1.0.0")}
        )
        assert same.status_code == 409 and "already current" in same.text
        unknown = client.post(path.format("@test/nope"), json={"package": str(root)})
        assert unknown.status_code == 404 and "@test/nope" in unknown.text
        nowhere = client.post(path.format("@test/rolled"), json={"package": "/nonexistent"})
        assert nowhere.status_code == 400 and "/nonexistent" in nowhere.text
        other = package(root, "9.0.0")
        (other / "rolled_model.py").write_text("raise ImportError('broken package')\n")
        broken = client.post(path.format("@test/rolled"), json={"package": str(other)})
        assert broken.status_code == 400 and "broken package" in broken.text
        odd = client.post(path.format("@test/rolled"), json={"package": str(other), "x": 1})
        assert odd.status_code == 400 and "'x'" in odd.text
        assert client.get(path.format("@test/rolled-async")).status_code == 404
        answer = client.post("/ai/run/@test/rolled", json={"text": "still"})
        assert answer.headers["omni-model-version"] == "1.0.0"


def test_the_command_line_rolls_out_and_back(runtime: tuple[RunningRuntime, Path]) -> None:
    running, root = runtime
    v2 = package(root, "2.0.0")

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "omni_runtime.cli", "rollout", "@test/rolled", *args,
             "--url", running.url],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    out = command("--package", str(v2))
    assert out.returncode == 0, out.stderr
    assert "1.0.0 -> 2.0.0" in out.stdout and "promoted" in out.stdout
    back = command("--to", "1.0.0")
    assert back.returncode == 0, back.stderr
    status = command("--status")
    assert '"to_version": "1.0.0"' in status.stdout and '"state": "promoted"' in status.stdout
    answer = httpx.post(f"{running.url}/ai/run/@test/rolled", json={"text": "x"}, timeout=30)
    assert answer.headers["omni-model-version"] == "1.0.0"


def test_killed_mid_rollout_the_runtime_comes_back_with_one_version(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/rolled".scaling]\nmin_replicas = 1\n')
    v1, v2, v3 = (package(tmp_path, v) for v in ("1.0.0", "2.0.0", "3.0.0"))
    extra = ["--shared-env", "--config", str(config), "--state-dir", str(state)]
    with serve(v1, extra=extra) as running:
        assert rollout(running.url, "@test/rolled", {"package": str(v2)})["state"] == "promoted"
        path = f"{running.url}/v2/repository/models/@test/rolled/rollout"
        canary = {"package": str(v3), "canary_percent": 50, "watch": "10m"}
        assert httpx.post(path, json=canary, timeout=60).status_code == 202
        deadline = time.monotonic() + 60
        while httpx.get(path, timeout=10).json()["state"] != "canary":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        running.stop(signal.SIGKILL, timeout=30)
    with serve(v1, extra=extra) as again:  # given v1's package, as before
        versions = set()
        for _ in range(10):
            answer = httpx.post(f"{again.url}/ai/run/@test/rolled", json={"text": "x"}, timeout=60)
            assert answer.status_code == 200, answer.text
            versions.add(answer.headers["omni-model-version"])
        assert versions == {"2.0.0"}  # the promoted version; nothing of the canary
