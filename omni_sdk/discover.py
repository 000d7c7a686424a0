"""``python -m omni_sdk.discover PACKAGE_DIR``: describe a model package's engines as JSON.

The runtime runs this with the package's own interpreter, so the runtime never imports
model code. It prints one JSON object: ``{"package": ..., "engines": [...]}``, or
``{"error": ..., "names": [...]}`` with exit status 1 (``names``: the engines registered before
the failure, when checking or describing one failed; the runtime may then run it again with
those models' settings, a TritonEngine's remote URL, say).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from omni_sdk._engine import Engine, EngineDefinitionError
from omni_sdk._plugins import EnginePlugins, PackageError


def describe(engine: type[Engine]) -> dict[str, Any]:
    """Everything the runtime needs to know about an engine without importing it."""
    signature = engine.signature()
    return {
        "name": engine.name,
        "task": engine.task,
        "description": engine.description or (engine.__doc__ or "").strip().split("\n")[0],
        "class": f"{engine.__module__}:{engine.__qualname__}",
        "inputs": [spec.metadata() | {"optional": not spec.required} for spec in signature.inputs],
        "outputs": [spec.metadata() for spec in signature.outputs],
        "input_schema": signature.request_model.model_json_schema(),
        "output_schema": signature.response_model.model_json_schema(),
        "resources": engine.resources.model_dump(),
        "scaling": engine.scaling.model_dump(),
        "max_batch_size": engine.max_batch_size,
        "async": inspect.iscoroutinefunction(
            engine.infer_batch if engine.max_batch_size > 1 else engine.infer
        )
        or inspect.isasyncgenfunction(engine.infer),
        "streaming": engine.is_streaming(),
    }


def discover(package_dir: Path, registered: list[str] | None = None) -> dict[str, Any]:
    """Describe the package's engines; ``registered`` gets their names as they register."""
    plugins = EnginePlugins()
    name = plugins.load_package(package_dir)
    engines = plugins.engines(registered)
    if not engines:
        raise PackageError(f"package {package_dir} ({name}) registers no engine")
    return {"package": name, "engines": [describe(e) for e in engines]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m omni_sdk.discover PACKAGE_DIR", file=sys.stderr)
        return 2
    package_dir = Path(args[0]).resolve()
    registered: list[str] = []
    try:
        result = discover(package_dir, registered)
    except (PackageError, EngineDefinitionError) as exc:
        print(json.dumps({"error": str(exc), "names": registered}))
        return 1
    except Exception as exc:  # model code can raise anything while importing
        error = f"package {package_dir}: {type(exc).__name__}: {exc}"
        print(json.dumps({"error": error, "names": registered}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
