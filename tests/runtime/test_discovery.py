"""Discovery imports a package's code: in the sandbox where there is one, and never forever."""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
from pathlib import Path

import pytest

from omni_runtime.discovery import (
    DiscoveryError,
    _check_unique,
    _registered,
    config_files,
    discover_all,
)
from omni_runtime.isolation import Isolation
from tests.conftest import FIXTURES


def _package(root: Path, body: str) -> Path:
    package = root / "slow-import"
    (package / "slow_import").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "omni-test-slow-import"
        version = "0.1.0"
        dependencies = ["omni-sdk"]

        [project.entry-points.omni]
        slow = "slow_import"
        """)
    )
    (package / "slow_import" / "__init__.py").write_text(textwrap.dedent(body))
    return package


def test_a_package_whose_import_never_ends_is_given_up(tmp_path: Path) -> None:
    package = _package(tmp_path, "import time\ntime.sleep(600)\n")
    discovery = asyncio.run(discover_all([package], {}, timeout=1.0))
    [failure] = discovery.failures
    assert "did not finish within 1s" in failure.error and str(package) in failure.error
    assert not discovery.models


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")
def test_discovery_imports_the_package_inside_the_sandbox(tmp_path: Path) -> None:
    # Module-level code of a package that reports who runs it, by failing with it.
    package = _package(tmp_path, "import os\nraise SystemExit(f'uid={os.getuid()}')\n")
    isolation = Isolation.sandbox_only([package, tmp_path / "state"], None)
    assert isolation is not None
    discovery = asyncio.run(discover_all([package], {}, isolation=isolation))
    [failure] = discovery.failures
    assert "uid=" in failure.error and "uid=0" not in failure.error, failure.error


def test_a_name_claimed_by_a_failed_discovery_counts_as_registered() -> None:
    # A package whose discovery fails after registering a neighbour's name (to be run again
    # with that model's env) is stopped like one that registered it cleanly.
    results = [
        {"engines": [{"name": "@b/two"}]},
        {"error": "ModelLoadError: ...", "names": ["@b/two"]},
    ]
    with pytest.raises(DiscoveryError, match="'@b/two' is registered by both /b and /squatter"):
        _check_unique([Path("/b"), Path("/squatter")], results)
    assert _registered({"error": "x"}) == [] and _registered(results[1]) == ["@b/two"]


def test_a_repository_setting_a_package_overrides_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    echo = FIXTURES / "packages" / "echo-models"  # its omni.toml: @test/files memory 300MiB
    config = tmp_path / "omni.toml"
    config.write_text(
        '[models."@test/files".resources]\nmemory = "500MiB"\ncpus = 2.0\n'
        '[models."@test/echo".scaling]\nmax_replicas = 2\n'
    )
    files = config_files([echo], config)
    with caplog.at_level(logging.WARNING, logger="omni.discovery"):
        discovery = asyncio.run(discover_all([echo], files))
    files_model = next(m for m in discovery.models if m.name == "@test/files")
    assert files_model.resources.memory == 300 << 20 and files_model.resources.cpus == 2.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # cpus and @test/echo's max_replicas are not overridden
    assert str(config) in warnings[0] and str(echo / "omni.toml") in warnings[0]
    assert "resources.memory = 500 MiB for model '@test/files'" in warnings[0]
    assert "sets it to 300 MiB, which wins" in warnings[0]
