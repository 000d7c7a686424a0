"""cgroup v2 code against a directory laid out like cgroupfs and a real v2 hierarchy mounted for
the test (where the machine allows); v1 code against the real one."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from omni_runtime.isolation import CgroupsV1, CgroupsV2, cgroupfs, cgroups_v2
from omni_sdk import Resources

RESOURCES = Resources(memory="256MiB", cpus=0.5)  # type: ignore[arg-type]


def _fake_v2(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_writes_limits_and_enables_controllers(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    cgroups = CgroupsV2(root, parent="/")
    assert cgroups.controllers == ["memory", "cpu", "pids"]
    base = root / f"omni-{os.getpid()}"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"

    worker = cgroups.create("worker-1", RESOURCES)
    assert worker.path == base / "worker-1"
    assert (worker.path / "memory.max").read_text() == str(256 << 20)
    assert (worker.path / "cpu.max").read_text() == "50000 100000"
    assert (worker.path / "pids.max").read_text() == "4096"
    assert (worker.path / "memory.oom.group").read_text() == "1"

    worker.add(12345)
    assert (worker.path / "cgroup.procs").read_text() == "12345"
    assert not worker.oom_killed()
    (worker.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert worker.oom_killed()
    (worker.path / "memory.current").write_text("1048576\n")
    assert worker.memory_bytes() == 1 << 20
    # Page cache it read (its package's files) is charged to it but is not what it holds.
    (worker.path / "memory.stat").write_text("anon 786432\nfile 262144\ninactive_file 262144\n")
    assert worker.memory_bytes() == 786432

    worker.remove()
    assert not worker.path.exists()
    cgroups.close()
    assert not base.exists()


def test_v2_uses_only_the_controllers_it_has(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    (root / "cgroup.controllers").write_text("memory\n")
    cgroups = CgroupsV2(root, parent="/")
    worker = cgroups.create("w", RESOURCES)
    assert (worker.path / "memory.max").exists()
    assert not (worker.path / "cpu.max").exists()


def test_v2_nests_under_the_runtime_cgroup(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    service = root / "system.slice" / "omni.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu memory pids\n")  # as cgroupfs shows it
    cgroups = CgroupsV2(root, parent="/system.slice/omni.service")
    worker = cgroups.create("w", RESOURCES)
    assert worker.path.parent.parent == root / "system.slice" / "omni.service"


real_v1 = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists(),
    reason="needs root and a cgroup v1 memory hierarchy",
)


@real_v1
def test_v1_limits_a_real_process() -> None:
    cgroups = CgroupsV1()
    worker = cgroups.create("test-worker", RESOURCES)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read(); bytearray(400 << 20)"],
        stdin=subprocess.PIPE,
    )
    try:
        memory = worker.paths["memory"]
        assert int((memory / "memory.limit_in_bytes").read_text()) == 256 << 20
        if "cpu" in worker.paths:
            assert (worker.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
        worker.add(child.pid)
        assert str(child.pid) in (memory / "cgroup.procs").read_text().split()
        assert not worker.oom_killed()
        assert child.stdin is not None
        child.stdin.close()  # now it allocates 400 MiB against a 256 MiB limit
        assert child.wait(60) == -9
        assert worker.oom_killed()
    finally:
        child.kill()
        child.wait()
        worker.remove()
        cgroups.close()
    assert not memory.exists()
    assert not any(base.exists() for base in cgroups.bases.values())


def test_stale_cgroups_of_dead_runtimes_are_swept(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f"omni-{dead.pid}" / "worker-3"
    stale.mkdir(parents=True)
    (stale / "memory.max").write_text("1")
    CgroupsV2(root, parent="/")
    assert not (root / f"omni-{dead.pid}").exists()


@pytest.fixture
def real_v2(tmp_path: Path) -> Iterator[Path]:
    """A real cgroup v2 hierarchy, mounted for the test (beside v1, it may lack controllers)."""
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "cgroup2", "none", str(mount)]).returncode
    ):
        pytest.skip("cannot mount a cgroup v2 hierarchy here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_v2_on_a_real_hierarchy_joins_kills_and_removes(real_v2: Path) -> None:
    """The v2 path against the kernel: a sandboxed process joins before it runs, and goes."""
    from omni_runtime.isolation import sandbox

    cgroups = CgroupsV2(real_v2, parent="/")
    worker = cgroups.create("worker-1", RESOURCES)
    assert worker.procs_files == [worker.path / "cgroup.procs"]
    spec = json.dumps({"package": "/", "cgroup_procs": [str(worker.procs_files[0])]})
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            sandbox.__file__,
            spec,
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/self/cgroup; exec sleep 60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = ""
        for line in iter(process.stdout.readline, ""):
            if line.startswith("0::"):
                break
        # Its first command already ran inside (v2's line is "0::<path>").
        assert line == f"0::/omni-{os.getpid()}/worker-1\n"
        assert str(process.pid) in (worker.path / "cgroup.procs").read_text().split()
        worker.kill()  # cgroup.kill, where the kernel has it
        assert process.wait(timeout=10) != 0
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    worker.remove()
    assert not worker.path.exists()
    cgroups.close()


def test_removal_on_the_event_loop_tries_again_later_instead_of_sleeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker-1"
    path.mkdir()
    busy = [3]  # its last processes take three tries to leave
    real_rmdir = Path.rmdir

    def rmdir(self: Path) -> None:
        if self == path and busy[0]:
            busy[0] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rmdir(self)

    def no_sleep(seconds: float) -> None:
        raise AssertionError("slept on the event loop")

    monkeypatch.setattr(Path, "rmdir", rmdir)
    monkeypatch.setattr(cgroupfs.time, "sleep", no_sleep)

    async def scenario() -> None:
        cgroupfs.remove_dir(path)  # returns at once, the loop carries on
        assert path.exists()
        await asyncio.sleep(0.2)
        assert not path.exists()

    asyncio.run(scenario())


def _service(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runtime's own cgroup, as a systemd service with Delegate=yes gives it."""
    service = root / "omni.service"
    service.mkdir()
    (service / "cgroup.controllers").write_text("cpu memory pids\n")
    (service / "cgroup.subtree_control").write_text("")
    (service / "cgroup.procs").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(cgroups_v2, "own_cgroup", lambda controller: "/omni.service")
    return service


def test_v2_close_leaves_the_runtime_where_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(_fake_v2(tmp_path), monkeypatch)
    runtime = CgroupsV2(tmp_path / "cgroup")
    runtime.create("worker-1", RESOURCES)
    assert (service / "omni-runtime" / "cgroup.procs").read_text() == str(os.getpid())
    runtime.close()
    assert sorted(p.name for p in service.iterdir() if p.is_dir()) == []  # no empty folder
    assert (service / "cgroup.procs").read_text() == str(os.getpid())  # back where it was
    assert (service / "cgroup.subtree_control").read_text() == "-memory -cpu -pids"


def test_v2_close_keeps_a_leaf_another_runtime_still_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(_fake_v2(tmp_path), monkeypatch)
    runtime = CgroupsV2(tmp_path / "cgroup")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (service / "omni-runtime" / "cgroup.procs").write_text(f"{os.getpid()}\n{other.pid}\n")
        runtime.close()
        assert (service / "omni-runtime").is_dir()
    finally:
        other.kill()
        other.wait()


def test_v1_close_kills_what_joined_after_the_first_look(monkeypatch: pytest.MonkeyPatch) -> None:
    cgroups = CgroupsV1()
    worker = cgroups.create("late", RESOURCES)
    late: list[subprocess.Popen[bytes]] = []
    kill_members = cgroupfs.kill_members

    def kill_then_fork(path: Path) -> None:
        # What a pre-warmed process forking a worker does at the wrong moment: a process
        # joins the cgroup after the runtime read cgroup.procs and killed what it found.
        kill_members(path)
        if not late:
            late.append(subprocess.Popen(["sleep", "60"]))
            worker.add(late[0].pid)

    monkeypatch.setattr(cgroupfs, "kill_members", kill_then_fork)
    try:
        cgroups.close()
        assert not any(base.exists() for base in cgroups.bases.values())
    finally:
        late[0].kill()
        late[0].wait()
        monkeypatch.undo()
        cgroups.close()
