"""The pure parts of the sandbox launcher; tests/e2e/test_sandbox.py checks it from inside."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni_runtime.isolation import Isolation, sandbox
from omni_runtime.isolation.mounts import _open_owned_dir, _unreachable_ancestor, meminfo_text
from omni_runtime.isolation.plan import MODEL_UID_BASE, UserIds, model_uid, worker_environment
from omni_runtime.isolation.sandbox import parse_spec
from omni_runtime.isolation.seccomp import REFUSED_SYSCALLS, install_seccomp_filter
from omni_runtime.isolation.syscalls import CLONE_NEWNS, CLONE_NEWUSER, SandboxError

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


def test_the_launcher_file_finds_its_modules_with_the_standard_library_alone() -> None:
    # Run as a file by an isolated interpreter, it imports the modules beside it (mounts.py,
    # seccomp.py, syscalls.py) before it reads its arguments.
    command = [sys.executable, "-I", "-S", sandbox.__file__]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "usage: sandbox.py" in result.stderr


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


def test_every_refused_system_call_is_refused_in_the_filtered_process() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    child = os.fork()
    if child == 0:  # the filter stays with the process: only a child may take it
        code = 0
        try:
            install_seccomp_filter()
            refused = [
                libc.unshare(CLONE_NEWUSER) == -1 and ctypes.get_errno() == errno.EPERM,
                libc.unshare(CLONE_NEWNS) == -1 and ctypes.get_errno() == errno.EPERM,
            ]
            grandchild = os.fork()  # a plain fork (clone without namespaces) still works
            if grandchild == 0:
                os._exit(7)
            forked = os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1]) == 7
            code = 0 if all(refused) and forked else 1
        except BaseException:
            code = 2
        os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


def test_the_refused_list_holds_real_system_calls() -> None:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    known = [n for n in REFUSED_SYSCALLS if lib.seccomp_syscall_resolve_name(n.encode()) >= 0]
    # Names of other architectures are skipped; the ones every architecture has are there.
    assert {"unshare", "setns", "mount", "ptrace", "bpf", "keyctl", "perf_event_open"} <= set(known)
    # -1: a name libseccomp does not know on any architecture (a misspelling, say).
    assert [n for n in REFUSED_SYSCALLS if lib.seccomp_syscall_resolve_name(n.encode()) == -1] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_is_given_to_the_model_by_descriptor_never_through_a_link(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    own = tmp_path / "own"
    own.mkdir(mode=0o777)
    path, fd = _open_owned_dir(str(own), 123456)
    os.close(fd)
    assert path == str(own) and (own.stat().st_uid, own.stat().st_mode & 0o777) == (123456, 0o700)
    target = tmp_path / "etc"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SandboxError, match="a link or no directory"):
        _open_owned_dir(str(tmp_path / "link"), 123456)
    assert target.stat().st_uid == 0
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 4242, 4242)  # someone else's
    with pytest.raises(SandboxError, match="belongs to user 4242"):
        _open_owned_dir(str(planted), 123456)
    open_to_all = tmp_path / "open"
    (open_to_all / "inside").mkdir(parents=True)
    open_to_all.chmod(0o777)  # anyone could swap what is inside
    with pytest.raises(SandboxError, match="is not root's alone"):
        _open_owned_dir(str(open_to_all / "inside"), 123456)
