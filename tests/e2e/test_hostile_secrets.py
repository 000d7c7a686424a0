"""Other models' secrets, four ways in: configuration files, discovery's environment and
network, and a package that registers another package's model name.

Two packages share a repository whose omni.toml gives each model a secret (and one of them
the node's network). Each package's code reports, at import (discovery) and per request
(worker), which secrets it sees, whether it reaches the host's loopback, and what it reads of
the configuration and token files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.runtime import serve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

ENGINE = """
import json, os, socket

from pydantic import BaseModel
from omni_sdk import Engine, hookimpl

PORT = {port}
FILES = {files!r}


def look():
    seen = {{"env": {{k: v for k, v in os.environ.items() if k.startswith("SECRET")}}}}
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
        seen["network"] = "host"
    except OSError:
        seen["network"] = "own"
    files = {{}}
    for path in FILES:
        try:
            with open(path) as f:
                files[path] = f.read()
        except OSError as exc:
            files[path] = exc.strerror
    seen["files"] = files
    return seen


AT_IMPORT = look()


class Ask(BaseModel):
    pass


class Seen(BaseModel):
    seen: str


class Looker(Engine):
    name = {name!r}
    description = json.dumps(AT_IMPORT)

    def infer(self, request: Ask) -> Seen:
        return Seen(seen=json.dumps(look()))


@hookimpl
def register_engines(register):
    register(Looker)
"""

REPOSITORY_TOML = """
[models."@a/one"]
network = "host"
[models."@a/one".env]
SECRET_ONE = "one-secret"

[models."@b/two".env]
SECRET_TWO = "two-secret"
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on the host's loopback: reachable only from the host's network."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def _package(repo: Path, directory: str, name: str, port: int, files: list[Path]) -> Path:
    package = repo / directory
    module = directory.replace("-", "_")
    package.mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [project]
        name = "omni-test-{directory}"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        {module} = "{module}"
        """)
    )
    text = ENGINE.format(port=port, files=[str(f) for f in files], name=name)
    (package / f"{module}.py").write_text(text)
    return package


def _repository(tmp_path: Path, port: int) -> tuple[Path, Path, Path, list[Path]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    config = tmp_path / "extra.toml"  # a --config file outside the repository
    config.write_text('[models."@b/two".env]\nSECRET_EXTRA = "extra-secret"\n')
    token = tmp_path / "api-token"
    token.write_text("SECRET-TOKEN-VALUE")
    token.chmod(0o644)
    files = [repo / "omni.toml", config, token, repo / "pkg-a" / "omni.toml"]
    (repo / "omni.toml").write_text(REPOSITORY_TOML)
    _package(repo, "pkg-a", "@a/one", port, files)
    _package(repo, "pkg-b", "@b/two", port, files)
    (repo / "pkg-a" / "omni.toml").write_text('[models."@a/one".env]\nSECRET_OWN = "own"\n')
    return repo, config, token, files


def _assert_no_file_read(seen: dict[str, Any]) -> None:
    for path, content in seen["files"].items():
        assert "SECRET" not in content and "secret" not in content, (path, content)


def test_discovery_sees_only_its_own_models_env_network_and_no_config(
    tmp_path: Path, listener: int
) -> None:
    repo, _, _, _ = _repository(tmp_path, listener)
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "models", str(repo), "--json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    models = {m["name"]: json.loads(m["description"]) for m in json.loads(result.stdout)["models"]}
    one, two = models["@a/one"], models["@b/two"]
    assert one["env"] == {"SECRET_ONE": "one-secret", "SECRET_OWN": "own"}
    assert one["network"] == "host"
    assert two["env"] == {"SECRET_TWO": "two-secret"}
    assert two["network"] == "own"  # another package's network = "host" is not its own
    _assert_no_file_read(one)
    _assert_no_file_read(two)


def test_a_worker_reads_neither_configuration_nor_token_files(
    tmp_path: Path, listener: int
) -> None:
    repo, config, token, _ = _repository(tmp_path, listener)
    with (
        serve(
            repo,
            extra=["--config", str(config), "--state-dir", str(tmp_path / "state")],
            env={"OMNI_API_TOKEN_FILE": str(token)},
        ) as runtime,
        httpx.Client(
            base_url=runtime.url,
            timeout=60,
            headers={"Authorization": "Bearer SECRET-TOKEN-VALUE"},
        ) as http,
    ):
        for model, own in (("@a/one", {"SECRET_ONE", "SECRET_OWN"}), ("@b/two", None)):
            response = http.post(f"/ai/run/{model}", json={})
            assert response.status_code == 200, response.text
            seen = json.loads(response.json()["result"]["seen"])
            expected = own or {"SECRET_TWO", "SECRET_EXTRA"}
            assert set(seen["env"]) == expected
            _assert_no_file_read(seen)


def test_two_packages_registering_one_model_name_stop_serve(tmp_path: Path, listener: int) -> None:
    repo, _, _, files = _repository(tmp_path, listener)
    # A package that sorts first and registers its neighbour's name, to take its secrets.
    _package(repo, "aaa-squatter", "@b/two", listener, files)
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(repo), "--port", "0",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"model '@b/two' is registered by both {repo / 'aaa-squatter'} and {repo / 'pkg-b'}"
        in result.stderr
    )
