"""Discovery imports a package, and so runs its code: in a cgroup of its own (it used to run
with no memory or process limit: 5,000 processes and 1.5 GiB from one package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ENGINE = """
import json

from pydantic import BaseModel
from omni_sdk import Engine, hookimpl

with open("/proc/self/cgroup") as f:
    CGROUP = f.read()


class Empty(BaseModel):
    pass


class Where(Engine):
    name = "@hostile/where"
    description = json.dumps(CGROUP)

    def infer(self, request: Empty) -> Empty:
        return Empty()


@hookimpl
def register_engines(register):
    register(Where)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_discovery_runs_in_a_cgroup_of_its_own(tmp_path: Path) -> None:
    package = tmp_path / "where-model"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "omni-test-where-model"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        where = "where_model"
        """)
    )
    (package / "where_model.py").write_text(ENGINE)
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "models", str(package), "--json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [model] = json.loads(result.stdout)["models"]
    cgroups = json.loads(model["description"])
    memory = next(
        line.split(":", 2)[2]
        for line in cgroups.splitlines()
        if line.split(":")[1] in ("", "memory") or "memory" in line.split(":")[1].split(",")
    )
    assert "/omni-" in memory and memory.rsplit("/", 1)[1].startswith("discover-"), cgroups
