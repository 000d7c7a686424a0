"""What a worker sees of the file system: its package read-only, a private /tmp, no neighbours."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

PACKAGES = FIXTURES / "packages"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def http(state_dir: Path) -> Iterator[httpx.Client]:
    extra = ["--state-dir", str(state_dir)]
    with (
        serve(PACKAGES / "echo-models", PACKAGES / "hog-model", extra=extra) as running,
        httpx.Client(base_url=running.url, timeout=60) as client,
    ):
        yield client


def _files(http: httpx.Client, path: Path | str, write: str | None = None) -> httpx.Response:
    return http.post("/ai/run/@test/files", json={"path": str(path), "write": write})


def test_own_package_is_readable_but_not_writable(http: httpx.Client) -> None:
    own = PACKAGES / "echo-models" / "pyproject.toml"
    assert "omni-test-echo-models" in _files(http, own).json()["result"]["text"]
    response = _files(http, PACKAGES / "echo-models" / "new.txt", write="x")
    assert response.status_code == 500
    assert "Read-only file system" in response.json()["errors"][0]["message"]
    assert not (PACKAGES / "echo-models" / "new.txt").exists()


def test_other_packages_are_invisible(http: httpx.Client) -> None:
    response = _files(http, PACKAGES / "hog-model" / "hog_model.py")
    assert response.status_code == 500
    assert "No such file or directory" in response.json()["errors"][0]["message"]
    assert (PACKAGES / "hog-model" / "hog_model.py").exists()  # it is there for everyone else


def test_tmp_is_private(http: httpx.Client, tmp_path: Path) -> None:
    name = f"/tmp/omni-sandbox-test-{os.getpid()}"
    assert _files(http, name, write="inside").json()["result"]["text"] == "inside"
    assert not Path(name).exists()


def test_meminfo_shows_the_memory_limit(http: httpx.Client) -> None:
    result = _files(http, PACKAGES / "echo-models" / "pyproject.toml").json()["result"]
    assert result["meminfo_total_kb"] == 300 * 1024


def test_configuration_files_cannot_be_opened(http: httpx.Client) -> None:
    # Its own package's omni.toml too: it may hold other models' env values.
    response = _files(http, PACKAGES / "echo-models" / "omni.toml")
    assert response.status_code == 500
    assert "Permission denied" in response.json()["errors"][0]["message"]


def test_the_runtime_state_is_invisible(http: httpx.Client, state_dir: Path) -> None:
    secret = state_dir / "secret.txt"
    secret.write_text("runtime only")
    response = _files(http, secret)
    assert response.status_code == 500
    assert "No such file or directory" in response.json()["errors"][0]["message"]
    environments = sorted((state_dir / "envs").iterdir())
    assert [e.name.rsplit("-", 2)[0] for e in environments] == ["echo-models", "hog-model"]
    other = next(e for e in environments if e.name.startswith("hog-model"))
    response = _files(http, other / "pyvenv.cfg")  # another model's environment
    assert response.status_code == 500


def test_no_other_process_is_visible_and_no_privilege_is_left(
    http: httpx.Client, state_dir: Path
) -> None:
    secret = state_dir / "secret.txt"
    secret.write_text("runtime only")
    # The runtime's view of the file system is not reachable through its /proc entry.
    response = _files(http, f"/proc/{os.getppid()}/root{secret}")
    assert response.status_code == 500
    response = _files(http, f"/proc/1/root{secret}")
    assert response.status_code == 500
    variables = http.post("/ai/run/@test/env", json={}).json()["result"]["variables"]
    assert variables["NSpid"].split()[-1] == "1"  # pid 1 of a namespace of its own
    assert int(variables["CapEff"], 16) == 0  # no capability at all
    assert int(variables["CapBnd"], 16) == 0  # and none to gain back
    assert variables["Uid"].split()[0] != "0"  # a user of its own, not root
