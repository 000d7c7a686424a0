"""Workers forked from a pre-warmed process: as isolated as fresh ones, and faster to start."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

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
