"""A catalog entry whose package is a pip requirement: every node installs the published
model package into the model's own environment and serves it, in the distribution's version.
The wheel is built here, by hand (a zip with its metadata), so nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.runtime import serve
from tests.fleet_etcd import EtcdCluster, requires_etcd

pytestmark = requires_etcd

ENGINE = """
from pydantic import BaseModel
from omni_sdk import Engine, hookimpl


class Req(BaseModel):
    text: str


class Resp(BaseModel):
    text: str


class Shout(Engine):
    name = "@test/shout"
    task = "text-generation"

    def infer(self, request: Req) -> Resp:
        return Resp(text=request.text.upper() + "{mark}")


@hookimpl
def register_engines(register):
    register(Shout)
"""


def wheel(where: Path, version: str, mark: str, entry_points: bool = True) -> Path:
    """A pure-Python wheel of ``omni-test-shout`` ``version`` whose engine appends ``mark``."""
    dist_info = f"omni_test_shout-{version}.dist-info"
    files = {
        "omni_test_shout/__init__.py": ENGINE.replace("{mark}", mark),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: omni-test-shout\nVersion: {version}\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: omni-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    if entry_points:
        files[f"{dist_info}/entry_points.txt"] = "[omni]\nshout = omni_test_shout\n"
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = where / f"omni_test_shout-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster(1) as cluster:
        yield cluster


def catalog(etcd: EtcdCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "omni_runtime.cli", "catalog", *args, "--fleet", etcd.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_pip_requirement_in_the_catalog_is_installed_and_served(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    first = wheel(tmp_path, "1.4.0", "!")
    second = wheel(tmp_path, "2.0.0", "!!")
    state = tmp_path / "state"
    extra = ["--fleet", etcd.url, "--node-name", "pip-1", "--state-dir", str(state)]
    with serve(extra=extra) as node:
        put = catalog(
            etcd, "put", "@test/shout", "--package", f"omni-test-shout @ {first.as_uri()}"
        )
        assert put.returncode == 0, put.stderr
        node.wait_for_line(r"serving model '@test/shout' from the catalog", timeout=120)
        answer = httpx.post(f"{node.url}/ai/run/@test/shout", json={"text": "hi"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["text"] == "HI!"
        assert answer.headers["omni-model-version"] == "1.4.0"  # the distribution's own

        # A new requirement of another version, under load: every node rolls it out, with
        # the new version started before traffic moves to it and no request failing.
        answers: list[tuple[int, str]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=node.url, timeout=60) as client:
                while not stop.is_set():
                    answer = client.post("/ai/run/@test/shout", json={"text": "hi"})
                    answers.append(
                        (answer.status_code, answer.headers.get("omni-model-version", ""))
                    )

        clients = [threading.Thread(target=load) for _ in range(3)]
        for client in clients:
            client.start()
        try:
            requirement = f"omni-test-shout @ {second.as_uri()}"
            put = catalog(etcd, "put", "@test/shout", "--package", requirement)
            assert put.returncode == 0, put.stderr
            node.wait_for_line(r"rollout 1\.4\.0 -> 2\.0\.0: promoted", timeout=120)
            time.sleep(1.0)
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert [a for a in answers if a[0] != 200] == []
        versions = [v for _, v in answers]
        assert versions[0] == "1.4.0" and versions[-1] == "2.0.0", versions
        answer = httpx.post(f"{node.url}/ai/run/@test/shout", json={"text": "hi"}, timeout=60)
        assert (answer.json()["result"]["text"], answer.headers["omni-model-version"]) == (
            "HI!!",
            "2.0.0",
        )
        catalog(etcd, "delete", "@test/shout")


def test_a_requirement_that_registers_no_engine_is_logged_and_not_served(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    plain = wheel(tmp_path, "1.0.0", "", entry_points=False)
    state = tmp_path / "state"
    extra = ["--fleet", etcd.url, "--node-name", "pip-2", "--state-dir", str(state)]
    with serve(extra=extra) as node:
        put = catalog(
            etcd, "put", "@test/shout", "--package", f"omni-test-shout @ {plain.as_uri()}"
        )
        assert put.returncode == 0, put.stderr
        line = node.wait_for_line(r"model '@test/shout': .*registers no engine", timeout=120)
        assert "omni-test-shout 1.0.0" in line and "[project.entry-points.omni]" in line
        answer = httpx.post(f"{node.url}/ai/run/@test/shout", json={"text": "hi"}, timeout=30)
        assert answer.status_code == 404, answer.text
        catalog(etcd, "delete", "@test/shout")


def test_a_package_that_is_neither_a_directory_nor_a_requirement_is_refused(
    etcd: EtcdCluster,
) -> None:
    put = catalog(etcd, "put", "@test/shout", "--package", "models/shout ==")
    assert put.returncode == 1
    assert "field 'package'" in put.stderr
    assert "neither an absolute package directory nor a pip requirement" in put.stderr
    assert put.stderr.count("\n") == 1  # one line, for the person who typed it
