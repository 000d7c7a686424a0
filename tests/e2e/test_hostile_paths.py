"""A local unprivileged user plants names in /dev/shm before a CUDA model starts.

The runtime used to name a worker's GPU usage directory ``/dev/shm/omni-gpu-<pid>-<n>.d`` and
take whatever was there: a link made the root launcher hand the link's target (``/etc``, say)
to the model's user and bind it writable; a directory kept its planter's access. Now the
directory is made new, under a name nobody can guess, and handed over by descriptor.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd"),
    reason="the sandbox needs root; the planter is a user made with useradd",
)

CUDA_CONFIG = '[models."@test/env"]\ndevice = "cuda"\n'


@pytest.fixture
def local_user() -> Iterator[str]:
    """A real unprivileged user of this machine, made for the test and removed after it."""
    name = f"omni-planter-{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _as_user(user: str, *command: str) -> None:
    subprocess.run(command, user=user, check=True, cwd="/")


@pytest.mark.parametrize("planted", ["link", "directory"])
def test_a_planted_name_in_dev_shm_is_never_used(
    planted: str, local_user: str, tmp_path: Path
) -> None:
    config = tmp_path / "omni.toml"
    config.write_text(CUDA_CONFIG)
    # Stands in for /etc: a root-owned directory the local user cannot write.
    target = tmp_path / "etc"
    target.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    with (
        serve(FIXTURES / "packages" / "echo-models", extra=["--config", str(config)]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        names = [f"/dev/shm/omni-gpu-{runtime.process.pid}-{n}.d" for n in range(1, 41)]
        if planted == "link":
            _as_user(
                local_user, "/bin/sh", "-c", 'for n; do ln -s "$0" "$n"; done', str(target), *names
            )
        else:
            _as_user(local_user, "mkdir", "-m", "777", *names)
        try:
            response = http.post("/ai/run/@test/env", json={})
            assert response.status_code == 200, response.text
            variables = response.json()["result"]["variables"]
            region_dir = Path(variables["OMNI_GPU_SHM_NAME"]).parent
            assert str(region_dir) not in names
            # The worker's region directory is its user's alone, made by the runtime.
            st = os.lstat(region_dir)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
            assert st.st_uid == int(variables["Uid"].split()[0]) != 0
            # What was planted is untouched: the link's target is still root's and not bound
            # into any sandbox; a planted directory is still its planter's, and unused.
            assert os.stat(target).st_uid == 0 and stat.S_IMODE(os.stat(target).st_mode) == 0o755
            for name in names:
                st = os.lstat(name)
                assert st.st_uid != 0 and st.st_uid != int(variables["Uid"].split()[0])
                if planted == "directory":
                    assert os.listdir(name) == []
        finally:
            for name in names:
                if os.path.islink(name):
                    os.unlink(name)
                elif os.path.isdir(name):
                    shutil.rmtree(name)
