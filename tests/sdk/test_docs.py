"""Every hook spec has a section in docs/plugins.md (as datasette checks its hooks)."""

from __future__ import annotations

import inspect

from omni_sdk import hookspecs
from tests.conftest import REPO


def test_every_hookspec_is_documented() -> None:
    docs = (REPO / "docs" / "plugins.md").read_text()
    specs = [
        name
        for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(obj, "omni_spec")
    ]
    assert specs, "no hook specs found"
    for name in specs:
        assert f"## {name}(" in docs, f"docs/plugins.md has no section for the hook {name}"
