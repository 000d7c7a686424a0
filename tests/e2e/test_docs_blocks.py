"""The code in the README and docs/ that is meant to run, run: the docs cannot drift.

A fenced block preceded by an HTML comment (invisible on the site) is run:

    <!-- test -->             a Python block, on its own, in a fresh interpreter
    <!-- test: continue -->   appended to the file's previous test block (it uses its names)
    <!-- test: examples -->   a Python or shell block against the runtime serving examples/
                              (127.0.0.1:8000 becomes its HTTP address, 127.0.0.1:8001 its gRPC)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.runtime import RunningRuntime

MARKED = re.compile(r"^<!-- test(?::\s*(\w+))? -->\n```(\w+)\n(.*?)^```", re.S | re.M)
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, str, str, str]]:
    """(id, mode, language, code), continuations already joined to their block."""
    blocks: list[tuple[str, str, str, str]] = []
    for path in FILES:
        text = path.read_text()
        for match in MARKED.finditer(text):
            mode, language, code = match.group(1) or "alone", match.group(2), match.group(3)
            line = text.count("\n", 0, match.start()) + 1
            if mode == "continue":
                assert blocks and blocks[-1][0].startswith(path.name), f"{path.name}:{line}"
                block_id, previous_mode, previous_language, previous = blocks.pop()
                blocks.append((block_id, previous_mode, previous_language, previous + code))
                continue
            blocks.append((f"{path.name}:{line}", mode, language, code))
    return blocks


BLOCKS = _blocks()


def test_some_blocks_are_marked() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(
    ("mode", "language", "code"),
    [b[1:] for b in BLOCKS if b[1] == "alone"],
    ids=[b[0] for b in BLOCKS if b[1] == "alone"],
)
def test_block_runs_on_its_own(mode: str, language: str, code: str, tmp_path: Path) -> None:
    assert language == "python"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("mode", "language", "code"),
    [b[1:] for b in BLOCKS if b[1] == "examples"],
    ids=[b[0] for b in BLOCKS if b[1] == "examples"],
)
def test_block_runs_against_the_examples(
    mode: str, language: str, code: str, examples: RunningRuntime, tmp_path: Path
) -> None:
    if language == "bash" and "curl" in code and shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    grpc = examples.wait_for_line(r"KServe v2 gRPC at \S+").rsplit(" ", 1)[1]
    code = code.replace("127.0.0.1:8000", examples.host_port).replace("127.0.0.1:8001", grpc)
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-ec", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if language == "bash":
        assert '"success": true' in result.stdout.replace('"success":true', '"success": true')
