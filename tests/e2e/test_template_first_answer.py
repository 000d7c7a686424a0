"""Every variant of `omni-runtime new` answers its first request right after `new`.

Nothing runs in between: not the package's own tests, not an install. One runtime serves all
four packages, and each first answer is checked against the model the template promises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.runtime import serve

X = [[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]]

# engine → (first request, the result it must get)
FIRST = {
    "python": ({"text": "a great day"}, {"label": "positive", "score": pytest.approx(1 / 3)}),
    # a Linear(4, 1), every weight 0.25, bias 1: y = mean(x) + 1
    "torch": ({"x": X}, {"y": [[3.5], [1.375]]}),
    # the placeholder graph: y = 2x + 1
    "onnx": ({"x": X}, {"y": [[2 * v + 1 for v in row] for row in X]}),
    "zero-code": ({"x": X}, {"y": [[2 * v + 1 for v in row] for row in X]}),
}


def _new(output: Path, engine: str) -> tuple[str, Path]:
    name = f"@cf/acme/first-{engine}"
    result = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "new", "--engine", engine, "--name", name,
         "--output-dir", str(output), "--no-input"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    package = output / name.rsplit("/", 1)[1]
    assert f"next: omni-runtime serve {package}" in result.stdout
    return name, package


def test_every_variant_answers_its_first_request_right_after_new(tmp_path: Path) -> None:
    packages = {engine: _new(tmp_path, engine) for engine in FIRST}
    paths = [package for _, package in packages.values()]
    with (
        serve(*paths, extra=["--state-dir", str(tmp_path / "state")], timeout=300) as runtime,
        httpx.Client(base_url=runtime.url, timeout=180) as http,
    ):
        answers = {}
        for engine, (name, _) in packages.items():
            response = http.post(f"/ai/run/{name}", json=FIRST[engine][0])
            answers[engine] = (response.status_code, response.json().get("result"), response.text)
    wrong = {
        engine: text
        for engine, (status, result, text) in answers.items()
        if (status, result) != (200, FIRST[engine][1])
    }
    assert not wrong  # every variant that answered wrongly, with its answer
