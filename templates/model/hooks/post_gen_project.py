"""Keep what the chosen engine kind needs: a zero-code package has no Python at all."""

import shutil
from pathlib import Path

ENGINE = "{{ cookiecutter.engine }}"
MODULE = Path("{{ cookiecutter.module_name }}")

if ENGINE == "zero-code":
    Path("pyproject.toml").unlink()
    shutil.rmtree("tests")
    (MODULE / "model.onnx").rename("model.onnx")
    shutil.rmtree(MODULE)
else:
    (MODULE / "model.onnx").unlink()  # the onnx engine's tests build their own graph
    if ENGINE == "python":
        (Path("tests") / "conftest.py").unlink()
