"""The pure parts of the sandbox launcher; tests/e2e/test_sandbox.py checks it from inside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omni_runtime.isolation import Isolation
from omni_runtime.isolation.plan import MODEL_UID_BASE, UserIds, model_uid, worker_environment
from omni_runtime.isolation.sandbox import (
    _unreachable_ancestor,
    meminfo_text,
    parse_spec,
)

HOST = """MemTotal:       24000000 kB
MemFree:        20000000 kB
MemAvailable:   22000000 kB
Buffers:          100000 kB
SwapTotal:       1000000 kB
SwapFree:        1000000 kB
"""


def test_meminfo_is_capped_at_the_limit() -> None:
    text = meminfo_text(300 << 20, HOST)
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()}
    assert values["MemTotal"] == values["MemFree"] == values["MemAvailable"] == 300 * 1024
    assert values["SwapTotal"] == values["SwapFree"] == 0
    assert values["Buffers"] == 100000  # the rest is the host's
    assert meminfo_text(64 << 30, HOST).startswith("MemTotal:       24000000 kB")


def test_a_spec_with_an_unknown_field_is_refused() -> None:
    assert parse_spec('{"package": "/pkg"}')["tmp_size"] == 256 << 20
    with pytest.raises(ValueError, match="unknown sandbox fields"):
        parse_spec('{"package": "/pkg", "netwrok": true}')


def test_each_model_has_its_own_stable_unprivileged_user(tmp_path: Path) -> None:
    seen: dict[int, str] = {}
    name = 0
    while model_uid(f"@t/m{name}") not in seen:  # two names whose hashes collide
        seen[model_uid(f"@t/m{name}")] = f"@t/m{name}"
        name += 1
    first, second = seen[model_uid(f"@t/m{name}")], f"@t/m{name}"
    ids = UserIds(tmp_path / "uids.json")
    a, b = ids.uid(first), ids.uid(second)
    assert a != b and min(a, b) >= MODEL_UID_BASE  # the second gets the next free one
    again = UserIds(tmp_path / "uids.json")  # a restart: the same users
    assert (again.uid(second), again.uid(first)) == (b, a)


def test_the_environment_is_reduced_to_the_allow_list_and_the_models_own(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "OMNI_API_TOKEN": "t",
            "LC_ALL": "C.UTF-8", "HOME": "/root"}  # fmt: skip
    env = worker_environment(base, {"MODEL_FLAG": "1"}, tmp_path)
    assert env["PATH"] == "/usr/bin" and env["LC_ALL"] == "C.UTF-8"
    assert env["MODEL_FLAG"] == "1" and env["HOME"] == str(tmp_path)
    assert "AWS_SECRET_ACCESS_KEY" not in env and "OMNI_API_TOKEN" not in env


def test_directories_a_user_cannot_enter_are_found(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "inside").mkdir(parents=True)
    closed.chmod(0o700)
    found = _unreachable_ancestor(str(closed / "inside"), 123456)
    assert found is not None and (closed / "inside").is_relative_to(found)
    assert _unreachable_ancestor("/usr/lib/python3", 123456) is None  # everyone may enter


def test_the_launcher_runs_isolated_with_the_runtimes_interpreter(tmp_path: Path) -> None:
    isolation = Isolation(None, True, (tmp_path / "other",), "test", tmp_path / "state")
    command = isolation.launcher(model="@t/m", package=tmp_path, environment=None, keep_fds=(7,))
    assert command[1:3] == ["-I", "-S"] and command[-1] == "--"
    spec = json.loads(command[4])
    assert spec["uid"] == isolation.user_ids.uid("@t/m") and spec["keep_fds"] == [7]
    assert spec["network"] is False and spec["hide"] == [str(tmp_path / "other")]
    assert os.path.isdir(spec["writable"][0])  # its cache directory, made for it


def test_a_neighbour_on_the_runtimes_path_stays_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    neighbour, own = tmp_path / "neighbour", tmp_path / "own"
    neighbour.mkdir()
    own.mkdir()
    monkeypatch.syspath_prepend(str(neighbour))  # installed editable beside the runtime
    monkeypatch.syspath_prepend(str(own))
    isolation = Isolation(None, True, (neighbour, own), "test", None)
    spec = json.loads(isolation.launcher(model="@t/m", package=own, environment=None)[4])
    assert spec["hide"] == [str(neighbour)]
    assert str(neighbour) not in spec["keep"] and str(own) in spec["keep"]
