"""A package that serves an installed distribution (``[tool.omni] engines-from``): its engines
are that distribution's ``omni`` entry points, and discovery reports its version."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from omni_sdk._plugins import PackageError, read_package
from omni_sdk.discover import discover


def package(where: Path, engines_from: str, entry_points: str = "") -> Path:
    where.mkdir()
    (where / "pyproject.toml").write_text(
        f'[project]\nname = "wrapper"\nversion = "0"\n{entry_points}\n'
        f'[tool.omni]\nengines-from = "{engines_from}"\n'
    )
    return where


def test_the_engines_and_version_are_the_installed_distributions(tmp_path: Path) -> None:
    # omni-example-minilm is installed with the project (scripts/setup.sh)
    wrapper = package(tmp_path / "w", "omni-example-minilm")
    found = discover(wrapper)
    assert found["version"] == importlib.metadata.version("omni-example-minilm")
    assert [e["name"] for e in found["engines"]] == ["@cf/sentence-transformers/all-minilm-l6-v2"]
    info = read_package(wrapper)
    assert info["entry_points"] == {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("omni-example-minilm").entry_points
        if ep.group == "omni"
    }


def test_a_distribution_that_is_not_installed_is_named(tmp_path: Path) -> None:
    wrapper = package(tmp_path / "w", "no-such-model-package")
    with pytest.raises(PackageError, match="'no-such-model-package', which is not installed"):
        read_package(wrapper)


def test_a_distribution_without_engines_is_named(tmp_path: Path) -> None:
    wrapper = package(tmp_path / "w", "pluggy")
    with pytest.raises(PackageError, match=r"distribution pluggy .* registers no engine"):
        read_package(wrapper)


def test_entry_points_of_its_own_as_well_are_refused(tmp_path: Path) -> None:
    own = '[project.entry-points.omni]\nmine = "mine"\n'
    wrapper = package(tmp_path / "w", "omni-example-minilm", own)
    with pytest.raises(PackageError, match="both set; keep one"):
        read_package(wrapper)
