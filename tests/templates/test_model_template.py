"""The cookiecutter template renders a package that tests, discovers and serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from cookiecutter.main import cookiecutter

from tests.conftest import REPO
from tests.e2e.runtime import serve

TEMPLATE = REPO / "templates" / "model"


def _render(tmp_path: Path) -> Path:
    out = cookiecutter(
        str(TEMPLATE),
        no_input=True,
        output_dir=str(tmp_path),
        extra_context={"model_name": "@cf/acme/tiny-sentiment", "memory": "512MiB"},
    )
    return Path(out)


def test_the_rendered_package_passes_its_own_tests(tmp_path: Path) -> None:
    package = _render(tmp_path)
    assert package.name == "tiny-sentiment"
    assert (package / "tiny_sentiment" / "__init__.py").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=package,
        env=dict(os.environ, PYTHONPATH=str(package)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_the_rendered_package_is_discovered_and_served(tmp_path: Path) -> None:
    package = _render(tmp_path)
    listed = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "models", str(package), "--json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    [model] = json.loads(listed)["models"]
    assert model["name"] == "@cf/acme/tiny-sentiment"
    assert model["resources"]["memory"] == 512 << 20  # from the package's omni.toml
    with serve(package, extra=["--state-dir", str(tmp_path / "state")]) as runtime:
        response = httpx.post(
            f"{runtime.url}/ai/run/@cf/acme/tiny-sentiment", json={"text": "a great day"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["result"]["label"] == "positive"
