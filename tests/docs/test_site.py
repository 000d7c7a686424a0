"""The documentation site builds with MkDocs in strict mode: no broken link, no page left out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    built = {p.parent.name for p in tmp_path.glob("*/index.html")} | {"index"}
    assert pages <= built, f"pages not in the site: {sorted(pages - built)}"


def test_every_page_is_in_the_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"mkdocs.yml's nav leaves out docs/{page.name}"
