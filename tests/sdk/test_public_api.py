"""The SDK's front door: the runtime and the engines use public modules only, and the SDK's own
modules import one another one way (no circle), so any of them can be imported first."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import omni_sdk

ROOT = Path(__file__).resolve().parents[2]
SDK = Path(omni_sdk.__file__).resolve().parent
SDK_MODULES = sorted(
    "omni_sdk" if p.stem == "__init__" else f"omni_sdk.{p.stem}" for p in SDK.glob("*.py")
)


def _imports(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every module an import statement in ``tree`` reaches, outside
    ``if TYPE_CHECKING:`` blocks. ``from omni_sdk import x`` gives ``omni_sdk.x`` when x is a
    module of the SDK, else ``omni_sdk`` (a name the package's ``__init__`` defines)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to ``package``: from . import x, from .x import y
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *base.split(".")])
                base = base.rstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}"
                private = base == "omni_sdk" and name.startswith("omni_sdk._")
                module = name in SDK_MODULES or (private and not alias.name.startswith("__"))
                yield node.lineno, name if module else base


def _private_sdk_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for line, module in _imports(tree, "")
        if module.startswith("omni_sdk._")
    ]


def test_runtime_and_engines_import_no_private_sdk_module() -> None:
    sources = [
        *(ROOT / "runtime" / "omni_runtime").rglob("*.py"),
        *(ROOT / "engines").glob("*/omni_engine_*/**/*.py"),
    ]
    assert len(sources) > 20
    found = [hit for path in sorted(sources) for hit in _private_sdk_imports(path)]
    assert not found, (
        "the runtime and the engines import only public omni_sdk modules (omni_sdk, "
        "omni_sdk.wire, omni_sdk.units, omni_sdk.envelopes, ...):\n" + "\n".join(found)
    )


def _sdk_graph() -> dict[str, set[str]]:
    """Module → the omni_sdk modules it imports (at import time or inside a function)."""
    graph: dict[str, set[str]] = {}
    for module in SDK_MODULES:
        path = SDK / ("__init__.py" if module == "omni_sdk" else f"{module[9:]}.py")
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {
            target
            for _, target in _imports(tree, "omni_sdk")
            if target in SDK_MODULES and target != module
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph``, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            found = visit(target, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    for module in graph:
        found = visit(module, [])
        if found:
            return found
    return None


def test_sdk_modules_import_one_another_one_way() -> None:
    graph = _sdk_graph()
    assert "omni_sdk._serving" in graph["omni_sdk._tensor_serving"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle or [])


@pytest.mark.parametrize("module", SDK_MODULES)
def test_each_sdk_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
