"""An engine's warm-up request: each new replica answers it before it takes traffic, so a
rollout moves traffic only to a warmed-up version, and a version whose warm-up fails never
gets any (the rollout fails, naming why, and the current version serves on)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.runtime import RunningRuntime, serve
from tests.e2e.test_rollout import Load, rollout

ENGINE = """
from pydantic import BaseModel
from omni_sdk import Engine, LoadContext, hookimpl

VERSION = {version!r}
FAIL_WARMUP = {fail_warmup!r}


class Request(BaseModel):
    text: str


class Answer(BaseModel):
    text: str
    version: str
    warmups: int  # warm-up requests this replica answered before this one


class Warmed(Engine):
    name = "@test/warmed"
    warmup = {{"text": "warm-up"}}

    def load(self, ctx: LoadContext) -> None:
        self.warmups = 0

    def infer(self, request: Request) -> Answer:
        if request.text == "warm-up":
            if FAIL_WARMUP:
                raise RuntimeError("the cache cannot be filled")
            self.warmups += 1
        return Answer(text=request.text, version=VERSION, warmups=self.warmups)


class ColdStarted(Warmed):
    name = "@test/cold-started"


@hookimpl
def register_engines(register):
    register(Warmed)
    register(ColdStarted)
"""


def package(root: Path, version: str, fail_warmup: bool = False) -> Path:
    directory = root / f"warmed-{version}"
    directory.mkdir()
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "omni-test-warmed"\nversion = "{version}"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\nwarmed = "warmed_model"\n'
    )
    (directory / "warmed_model.py").write_text(
        ENGINE.format(version=version, fail_warmup=fail_warmup)
    )
    return directory


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[RunningRuntime, Path]]:
    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/warmed".scaling]\nmin_replicas = 1\n')
    v1 = package(tmp_path, "1.0.0")
    extra = ["--shared-env", "--config", str(config)]
    with serve(v1, extra=extra) as running:
        yield running, tmp_path


def _answer(url: str, model: str) -> dict[str, object]:
    answer = httpx.post(f"{url}/ai/run/{model}", json={"text": "x"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]  # type: ignore[no-any-return]


def test_a_new_version_is_warmed_up_before_traffic_moves(
    runtime: tuple[RunningRuntime, Path],
) -> None:
    running, root = runtime
    # A replica started with nobody waiting (min_replicas) answered its warm-up first ...
    assert _answer(running.url, "@test/warmed")["warmups"] == 1
    # ... a cold start with a request waiting does not make that request wait for it too.
    assert _answer(running.url, "@test/cold-started")["warmups"] == 0
    with Load(running.url, "@test/warmed") as load:
        state = rollout(running.url, "@test/warmed", {"package": str(package(root, "2.0.0"))})
    assert state["state"] == "promoted", state
    assert {status for status, _, _ in load.answers} == {200}
    first_of_v2 = _answer(running.url, "@test/warmed")
    assert first_of_v2["version"] == "2.0.0" and first_of_v2["warmups"] == 1


def test_a_failing_warm_up_fails_the_rollout_and_the_current_version_serves_on(
    runtime: tuple[RunningRuntime, Path],
) -> None:
    running, root = runtime
    broken = package(root, "2.0.0", fail_warmup=True)
    with Load(running.url, "@test/warmed") as load:
        state = rollout(running.url, "@test/warmed", {"package": str(broken)}, timeout=120)
    assert state["state"] == "failed", state
    assert "warm-up request failed" in state["reason"], state
    assert "the cache cannot be filled" in state["reason"], state
    assert Counter((s, v) for s, v, _ in load.answers).keys() == {(200, "1.0.0")}
    assert _answer(running.url, "@test/warmed")["version"] == "1.0.0"
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'omni_rollouts_total{model="@test/warmed",outcome="failed"} 1.0' in metrics
