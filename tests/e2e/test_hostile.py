"""A hostile model package, written here, tries every escape at import time and per request.

Each probe reports what it got; the test checks that the sandbox held, in discovery, in the
worker's import of the package, and in ``infer``.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.runtime import RunningRuntime, serve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

TOKEN = f"omni-hostile-{os.getpid()}"
HOST_TARGETS = [f"/etc/{TOKEN}", f"/var/tmp/{TOKEN}", f"/root/{TOKEN}", f"/usr/{TOKEN}"]

PROBES = """
import json, os, socket

TARGETS = {targets!r}


def kernel_calls():
    # What the kernel answers to calls a container refuses: the errno's name, or "ok".
    import ctypes, errno, platform
    libc = ctypes.CDLL(None, use_errno=True)
    keyctl = {{"x86_64": 250, "aarch64": 219}}[platform.machine()]
    clone = {{"x86_64": 56, "aarch64": 220}}[platform.machine()]
    calls = {{
        "unshare_user": lambda: libc.unshare(0x10000000),
        "unshare_mount": lambda: libc.unshare(0x00020000),
        "clone_user": lambda: libc.syscall(clone, 0x10000000 | 17, 0, 0, 0, 0),
        "keyctl": lambda: libc.syscall(keyctl, 0, -3, 1),  # the session keyring's id
    }}
    results = {{}}
    for name, call in calls.items():
        child = os.fork()
        if child == 0:  # in a child: a call that works must not change the probe itself
            result = call()
            os._exit(0 if result >= 0 else min(ctypes.get_errno(), 255) or 255)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        results[name] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
    return results


def probe(port):
    report = {{"uid": os.getuid(), "writes": {{}}}}
    for path in TARGETS + [os.path.join(os.path.dirname(__file__), "planted.py")]:
        try:
            with open(path, "w") as f:
                f.write("x")
            report["writes"][path] = "written"
        except OSError as exc:
            report["writes"][path] = exc.strerror
    try:
        with open("/etc/shadow") as f:
            f.read()
        report["shadow"] = "read"
    except OSError as exc:
        report["shadow"] = exc.strerror
    cgroup_writes = []
    for top, dirs, files in os.walk("/sys/fs/cgroup"):
        if top.count("/") > 5:
            dirs[:] = []
        for name in ("cgroup.procs", "tasks", "memory.limit_in_bytes", "memory.max"):
            if name in files:
                try:
                    with open(os.path.join(top, name), "w") as f:
                        f.write("0")
                    cgroup_writes.append(os.path.join(top, name))
                except OSError:
                    pass
    report["cgroup_writes"] = cgroup_writes
    report["dev_shm"] = sorted(os.listdir("/dev/shm"))
    report["secret"] = os.environ.get("OMNI_HOSTILE_SECRET")
    report["model_env"] = os.environ.get("HOSTILE_FLAG")
    report["pids"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
    report["syscalls"] = kernel_calls()
    stat = os.statvfs("/tmp")
    report["tmp_bytes"] = stat.f_blocks * stat.f_frsize
    if port:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            report["runtime_api"] = "reachable"
        except OSError as exc:
            report["runtime_api"] = exc.strerror or str(exc)
    return report


# At import: discovery and every worker run this before any engine exists.
_at_import = probe(None)
_home = os.environ.get("HOME")
if _home:
    try:
        with open(os.path.join(_home, "import-report.json"), "w") as f:
            json.dump(_at_import, f)
    except OSError:
        pass
"""

ENGINES = """
from pydantic import BaseModel

from omni_sdk import Engine, hookimpl
from hostile_model._probes import probe


class Ask(BaseModel):
    port: int


class Report(BaseModel):
    report: str


class Boxed(Engine):
    name = "@hostile/boxed"
    task = "text-classification"

    def infer(self, request: Ask) -> Report:
        import json
        return Report(report=json.dumps(probe(request.port)))


class Networked(Boxed):
    name = "@hostile/networked"


@hookimpl
def register_engines(register):
    register(Boxed)
    register(Networked)
"""


def _write_package(root: Path) -> Path:
    package = root / "hostile-model"
    (package / "hostile_model").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "omni-test-hostile-model"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        hostile = "hostile_model"
        """)
    )
    (package / "omni.toml").write_text(
        textwrap.dedent("""
        [models."@hostile/boxed".env]
        HOSTILE_FLAG = "yes"

        [models."@hostile/networked"]
        network = "host"
        """)
    )
    (package / "hostile_model" / "_probes.py").write_text(PROBES.format(targets=HOST_TARGETS))
    (package / "hostile_model" / "__init__.py").write_text(ENGINES)
    return package


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRuntime, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    package = _write_package(root)
    state = root / "state"
    canary = Path("/dev/shm") / f"{TOKEN}-canary"
    canary.write_text("the host's shared memory")
    try:
        with serve(
            package, extra=["--state-dir", str(state)], env={"OMNI_HOSTILE_SECRET": "s3cret"}
        ) as running:
            yield running, state
    finally:
        canary.unlink()
        for target in HOST_TARGETS:
            if os.path.exists(target):
                os.unlink(target)


def _ask(runtime: RunningRuntime, model: str) -> dict[str, Any]:
    port = urlsplit(runtime.url).port
    response = httpx.post(f"{runtime.url}/ai/run/{model}", json={"port": port}, timeout=60)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = json.loads(response.json()["result"]["report"])
    return report


def _assert_contained(report: dict[str, Any], runtime_pid: int) -> None:
    assert report["uid"] != 0
    for path, outcome in report["writes"].items():
        assert outcome != "written", path
    assert report["shadow"] != "read"
    assert report["cgroup_writes"] == []
    assert f"{TOKEN}-canary" not in report["dev_shm"]
    assert report["secret"] is None
    assert str(runtime_pid) not in report["pids"]
    assert report["tmp_bytes"] <= 256 << 20
    # seccomp: no namespace of its own (a user namespace least of all), no kernel keyring.
    assert report["syscalls"] == dict.fromkeys(
        ("unshare_user", "unshare_mount", "clone_user", "keyctl"), "EPERM"
    )


def test_nothing_escapes_at_import_or_request_time(
    hostile: tuple[RunningRuntime, Path],
) -> None:
    runtime, state = hostile
    at_request = _ask(runtime, "@hostile/boxed")
    _assert_contained(at_request, runtime.process.pid)
    assert at_request["model_env"] == "yes"  # what its omni.toml sets, and only that
    assert at_request["runtime_api"] != "reachable"  # a network namespace of its own
    [import_report] = list((state / "cache").glob("hostile-boxed-*/import-report.json"))
    _assert_contained(json.loads(import_report.read_text()), runtime.process.pid)
    # Discovery imported the package too, and left nothing on the host either.
    for target in HOST_TARGETS:
        assert not os.path.exists(target), target
    assert httpx.get(f"{runtime.url}/v2/health/ready", timeout=10).status_code == 200


def test_network_host_opts_a_model_into_the_nodes_network(
    hostile: tuple[RunningRuntime, Path],
) -> None:
    runtime, _ = hostile
    report = _ask(runtime, "@hostile/networked")
    assert report["runtime_api"] == "reachable"
    _assert_contained(report, runtime.process.pid)
    assert report["model_env"] is None  # the other model's env is not this one's
