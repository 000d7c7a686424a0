"""A model package whose dependency must be built from source: its build code is hostile.

It used to run as root, outside any sandbox, with the runtime's tokens in its environment (it
wrote into /root). Now dependencies install from wheels only unless the repository's omni.toml
allows source builds; those run in the sandbox as a user of the package's own; and uv never
gets the runtime's tokens or cloud credentials.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

TOKEN = f"omni-build-{os.getpid()}"

# An in-tree build backend with no requirements of its own: uv runs it without downloading
# anything. Importing it is the attack; building a wheel afterwards makes the install work.
BACKEND = """
import json, os, zipfile

try:
    with open({root_target!r}, "w") as f:
        f.write("written by a dependency's build")
    ROOT = "written"
except OSError as exc:
    ROOT = exc.strerror
# What the build saw travels in the wheel it builds: in a sandbox, that is all it can write.
SEEN = json.dumps({{"uid": os.getuid(), "environ": dict(os.environ), "root": ROOT}})


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "evil_dep-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        wheel.writestr("evil_dep/__init__.py", "")
        wheel.writestr("evil_dep/seen.json", SEEN)
        info = "evil_dep-0.1.dist-info/"
        metadata = "Metadata-Version: 2.1\\nName: evil-dep\\nVersion: 0.1\\n"
        wheel.writestr(info + "METADATA", metadata)
        tags = "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
        wheel.writestr(info + "WHEEL", tags)
        wheel.writestr(info + "RECORD", "")
    return name
"""

ENGINE = """
from pydantic import BaseModel
from omni_sdk import Engine, hookimpl


class Empty(BaseModel):
    pass


class Built(Engine):
    name = "@hostile/built"

    def infer(self, request: Empty) -> Empty:
        return Empty()


@hookimpl
def register_engines(register):
    register(Built)
"""


def _write(root: Path) -> tuple[Path, Path]:
    package = root / "repo" / "built-model"
    dependency = package / "vendor" / "evil-dep"  # beside the package, as a vendored one is
    dependency.mkdir(parents=True)
    root_target = Path("/root") / TOKEN
    (dependency / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = []
        build-backend = "backend"
        backend-path = ["."]

        [project]
        name = "evil-dep"
        version = "0.1"
        """)
    )
    (dependency / "backend.py").write_text(BACKEND.format(root_target=str(root_target)))
    (package / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [project]
        name = "omni-test-built-model"
        version = "0.1.0"
        dependencies = ["omni-sdk", "evil-dep @ {dependency.as_uri()}"]

        [project.entry-points.omni]
        built = "built_model"
        """)
    )
    (package / "built_model.py").write_text(ENGINE)
    return package, root_target


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on a runtime running as root")
@pytest.mark.parametrize("source_builds", [False, True])
def test_a_dependencys_build_gets_neither_root_by_default_nor_the_tokens(
    tmp_path: Path, source_builds: bool
) -> None:
    package, root_target = _write(tmp_path)
    state = tmp_path / "state"
    if source_builds:
        (package.parent / "omni.toml").write_text("[server]\nsource_builds = true\n")
    secrets = {
        "OMNI_API_TOKEN": "api-secret",
        "OMNI_ADMIN_TOKEN": "admin-secret",
        "AWS_SECRET_ACCESS_KEY": "cloud-secret",
    }
    try:
        with (
            serve(
                package.parent,
                FIXTURES / "packages" / "echo-models",  # something to serve either way
                extra=["--state-dir", str(state)],
                env=secrets,
                timeout=300,
            ) as runtime,
            httpx.Client(
                base_url=runtime.url,
                timeout=60,
                headers={"Authorization": "Bearer admin-secret"},
            ) as http,
        ):
            index = {e["name"]: e for e in http.post("/v2/repository/index", json={}).json()}
            if not source_builds:
                # Nothing of the dependency ran: the package failed, saying why and what to do.
                assert not root_target.exists()
                [failed] = [e for e in index.values() if e["state"] == "UNAVAILABLE"]
                assert "evil-dep" in failed["reason"]
                assert "[server] source_builds = true" in failed["reason"]
                assert "@hostile/built" not in index
                return
            # The operator allowed builds: the build ran in the sandbox, as a user of its own,
            # without a token or a cloud key, and could not write into /root.
            assert "@hostile/built" in index, index
            [seen] = state.glob("envs/built-model-*/lib/python3*/site-packages/evil_dep/seen.json")
            report = json.loads(seen.read_text())
            assert report["uid"] != 0
            assert report["root"] != "written" and not root_target.exists()
            environ = report["environ"]
            for name, value in secrets.items():
                assert name not in environ
                assert value not in json.dumps(environ)
    finally:
        root_target.unlink(missing_ok=True)
