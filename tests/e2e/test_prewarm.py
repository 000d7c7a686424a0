"""Workers forked from a pre-warmed process: as isolated as fresh ones, and faster to start."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve

CONFIG = (
    '[scheduler]\nstable_window = "2s"\npanic_window = "1s"\n'
    '[models."@test/env".scaling]\nidle_timeout = "1s"\n'
)


def memory_cgroup(text: str) -> str:
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "memory") or "memory" in controllers.split(","):
            return path
    return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and cgroups need root")
def test_a_forked_worker_is_as_isolated_as_a_fresh_one(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text(CONFIG)
    with (
        serve(FIXTURES / "packages" / "echo-models", extra=["--config", str(config)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        fresh = http.post("/ai/run/@test/env", json={}).json()["result"]["variables"]
        runtime.wait_for_line(r"pre-warmed process for .*: pid \d+")
        runtime.wait_for_line(r"model '@test/env': stopped replica 1")
        mark = len(runtime.lines)
        forked = http.post("/ai/run/@test/env", json={}).json()["result"]["variables"]
        runtime.wait_for_line(
            r"model '@test/env' ready: .*forked from a pre-warmed process", start=mark
        )
        own_mnt = os.readlink("/proc/self/ns/mnt")
        runtime_cgroup = memory_cgroup(Path(f"/proc/{runtime.process.pid}/cgroup").read_text())
        assert fresh["NSpid"] == "1"  # pid 1 of a pid namespace of its own
        # A fork keeps the pid the runtime sees; its /proc shows its own user's processes alone.
        assert forked["NSpid"] == forked["OMNI_WORKER_PID"]
        visible = forked["visible_pids"].split()
        assert forked["OMNI_WORKER_PID"] in visible and str(runtime.process.pid) not in visible
        assert str(os.getpid()) not in visible
        for variables in (fresh, forked):
            assert variables["CapEff"] == "0000000000000000"  # no capability at all
            assert variables["Uid"].split()[0] == fresh["Uid"].split()[0] != "0"  # the model's
            assert variables["mnt_ns"] != own_mnt
            assert variables["OMNI_WORKER_PID"] != str(runtime.process.pid)
        fresh_cgroup, forked_cgroup = (
            memory_cgroup(fresh["cgroup"]),
            memory_cgroup(forked["cgroup"]),
        )
        if runtime_cgroup:  # cgroups in use: each worker in a cgroup of its own
            assert re.search(r"worker-\d+$", fresh_cgroup), fresh_cgroup
            assert re.search(r"worker-\d+$", forked_cgroup), forked_cgroup
            assert fresh_cgroup != forked_cgroup != runtime_cgroup
        runtime.wait_for_line(r"cold start of replica 2 took .*spawn", start=mark)


def test_prewarm_timeout_zero_turns_it_off(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text(
        CONFIG.replace('panic_window = "1s"\n', 'panic_window = "1s"\nprewarm_timeout = 0\n')
    )
    with (
        serve(FIXTURES / "packages" / "echo-models", extra=["--config", str(config)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        assert http.post("/ai/run/@test/env", json={}).status_code == 200
        runtime.wait_for_line(r"model '@test/env': stopped replica 1")
        assert http.post("/ai/run/@test/env", json={}).status_code == 200
        runtime.wait_for_line(r"model '@test/env' ready: replica 2, .*, started in")
        assert not any("pre-warmed" in line for line in runtime.lines)


FRAMEWORKS = (
    '[scheduler]\nstable_window = "2s"\npanic_window = "1s"\n'
    '[models."@test/torch-sum".scaling]\nidle_timeout = "1s"\n'
    '[models."@test/ort-version".scaling]\nidle_timeout = "1s"\n'
)


def back_from_zero(
    runtime: RunningRuntime, http: httpx.Client, model: str, prewarmed_after: str = ""
) -> str:
    """Ask ``model`` once, let it scale to zero, ask again: how its second replica started.

    The second request waits for the pre-warmed process started after a line matching
    ``prewarmed_after``, if given."""
    first = http.post(f"/ai/run/{model}", json={"values": [1, 2, 3]})
    assert first.status_code == 200, first.text
    assert first.json()["result"]["result"] == 6.0
    runtime.wait_for_line(rf"model '{re.escape(model)}': stopped replica")
    start = 0
    if prewarmed_after:
        runtime.wait_for_line(prewarmed_after)
        start = next(i for i, line in enumerate(runtime.lines) if re.search(prewarmed_after, line))
    runtime.wait_for_line(
        rf"pre-warmed process for model '{re.escape(model)}': pid \d+", start=start
    )
    mark = len(runtime.lines)
    second = http.post(f"/ai/run/{model}", json={"values": [4, 5]})
    assert second.status_code == 200, second.text
    assert second.json()["result"]["result"] == 9.0
    return runtime.wait_for_line(rf"model '{re.escape(model)}' ready: replica", start=mark)


def test_models_of_real_frameworks_are_forked_from_a_prewarmed_process(tmp_path: Path) -> None:
    """torch's own module objects are no tampering, and a module whose import starts a thread
    (onnxruntime's) is left to the worker while the rest is still preloaded."""
    config = tmp_path / "omni.toml"
    config.write_text(FRAMEWORKS)
    with (
        serve(
            FIXTURES / "packages" / "framework-models", extra=["--config", str(config)]
        ) as runtime,
        httpx.Client(base_url=runtime.url, timeout=120) as http,
    ):
        torch_start = back_from_zero(runtime, http, "@test/torch-sum")
        assert "forked from a pre-warmed process" in torch_start, torch_start
        retried = (
            r"model '@test/ort-version': pre-warming again without onnxruntime "
            r"\(importing onnxruntime\S* started a thread"
        )
        ort_start = back_from_zero(runtime, http, "@test/ort-version", prewarmed_after=retried)
        assert "forked from a pre-warmed process" in ort_start, ort_start
        metrics = http.get("/metrics").text
        assert (
            'omni_prewarm_refusals_total{model="@test/ort-version",reason="threads"} 1.0' in metrics
        )
        assert 'omni_prewarm_refusals_total{model="@test/torch-sum"' not in metrics
        # torch was imported ahead: the fork found it there (its worker imported nothing).
        assert not any("not pre-warming" in line and "torch" in line for line in runtime.lines)
