"""The runtime's layout as docs/architecture.md shows it: six folders, no module over 400
lines, and modules that import one another one way (no circle), so that each can be read
(and changed) starting from what it imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import omni_runtime
from tests.sdk.test_public_api import _cycle

RUNTIME = Path(omni_runtime.__file__).resolve().parent
FOLDERS = {"server", "scheduler", "workers", "isolation", "batch", "fleet"}
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = ["omni_runtime", *path.relative_to(RUNTIME).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module(p): p for p in sorted(RUNTIME.rglob("*.py"))}


def test_the_runtime_has_six_folders() -> None:
    folders = {
        p.name for p in RUNTIME.iterdir() if p.is_dir() and any(p.glob("*.py"))
    }  # (a folder without Python, such as templates/, is data)
    assert folders == FOLDERS


def test_no_runtime_module_is_over_400_lines() -> None:
    long = {
        f"{path.relative_to(RUNTIME)}: {lines}"
        for path in SOURCES.values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {sorted(long)}"


def _imported(path: Path, package: str) -> Iterator[str]:
    """The runtime modules ``path`` imports (at import time or in a function), outside
    ``if TYPE_CHECKING:``; ``from omni_runtime.x import y`` is module ``x.y`` when y is one."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in SOURCES:  # a name inside a module: that module
                name = name.rpartition(".")[0]
            if name:
                yield name


def test_runtime_modules_import_one_another_one_way() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in SOURCES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = set(_imported(path, package)) - {module}
    assert len(graph) > 40
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle or [])
