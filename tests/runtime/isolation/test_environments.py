"""Package environments built with uv over the runtime's environment as a base layer."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from omni_runtime.isolation.environments import (
    EnvironmentBuilder,
    EnvironmentError_,
    build_environment,
)
from tests.conftest import FIXTURES


def _copy(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / package.name
    shutil.copytree(package, target)
    return target


def test_a_package_with_nothing_extra_shares_the_base_layer(tmp_path: Path) -> None:
    package = _copy(FIXTURES / "packages" / "echo-models", tmp_path)
    builder = EnvironmentBuilder(tmp_path / "envs")
    assert builder.missing(package) == []
    first = asyncio.run(builder.ensure(package))
    assert first.built
    assert first.installed == ()
    result = subprocess.run(
        [str(first.python), "-c", "import omni_sdk, pydantic; print(pydantic.__file__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert builder.base_site in result.stdout  # pydantic comes from the base layer
    again = asyncio.run(builder.ensure(package))
    assert not again.built  # unchanged: no install step at all
    assert again.path == first.path


def test_a_changed_package_gets_a_new_environment_and_the_old_one_goes(tmp_path: Path) -> None:
    package = _copy(FIXTURES / "packages" / "echo-models", tmp_path)
    builder = EnvironmentBuilder(tmp_path / "envs")
    old = asyncio.run(builder.ensure(package))
    pyproject = package / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.2.0"'))
    new = asyncio.run(builder.ensure(package))
    assert new.built and new.path != old.path
    assert not old.path.exists()


def test_pinned_versions_are_installed_beside_the_base_layer(tmp_path: Path) -> None:
    package = _copy(FIXTURES / "conflicts" / "six-old", tmp_path)
    builder = EnvironmentBuilder(tmp_path / "envs")
    assert builder.missing(package) == ["six==1.16.0"]
    environment = asyncio.run(builder.ensure(package))
    version = subprocess.run(
        [str(environment.python), "-c", "import six; print(six.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == "1.16.0"


def test_an_unresolvable_requirement_fails_with_the_resolvers_message(tmp_path: Path) -> None:
    package = _copy(FIXTURES / "conflicts" / "unresolvable", tmp_path)
    builder = EnvironmentBuilder(tmp_path / "envs")
    with pytest.raises(EnvironmentError_) as info:
        asyncio.run(builder.ensure(package))
    message = str(info.value)
    assert str(package) in message
    assert "six==0.0.1" in message
    assert not list((tmp_path / "envs").glob("unresolvable*"))  # nothing half-built is left


def test_an_indirect_conflict_with_the_base_layer_is_named(tmp_path: Path) -> None:
    package = _copy(FIXTURES / "conflicts-indirect" / "old-requests", tmp_path)
    builder = EnvironmentBuilder(tmp_path / "envs")
    if builder.base.get("idna", "0").split(".")[0] < "3":
        pytest.skip("the base layer's idna fits requests 2.25 anyway")
    with pytest.raises(EnvironmentError_) as info:
        asyncio.run(builder.ensure(package))
    message = str(info.value)
    assert "requests 2.25.1 needs idna" in message
    assert "but the base layer has idna 3." in message
    assert "to the package's own dependencies" in message


def test_uv_never_gets_the_runtimes_tokens_or_cloud_keys() -> None:
    env = build_environment(
        {
            "PATH": "/usr/bin", "HOME": "/root", "UV_INDEX_URL": "https://example/simple",
            "HTTPS_PROXY": "http://proxy:3128", "OMNI_API_TOKEN": "a", "OMNI_ADMIN_TOKEN": "b",
            "OMNI_API_TOKEN_FILE": "/run/token", "AWS_SECRET_ACCESS_KEY": "c",
            "GOOGLE_APPLICATION_CREDENTIALS": "/key.json",
        }
    )  # fmt: skip
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    assert env["UV_INDEX_URL"] == "https://example/simple"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert not {k for k in env if "TOKEN" in k or k.startswith(("AWS_", "GOOGLE_"))}
