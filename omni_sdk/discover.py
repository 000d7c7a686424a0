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

from pydantic import BaseModel

from omni_sdk._engine import Engine, EngineDefinitionError
from omni_sdk._plugins import EnginePlugins, PackageError
from omni_sdk._tensor_engine import TensorEngine


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
        "input_schema_exact": _validated_by(engine, signature.request_model)
        and schema_is_exact(signature.request_model),
        "output_schema": signature.response_model.model_json_schema(),
        "resources": engine.resources.model_dump(),
        "scaling": engine.scaling.model_dump(),
        "max_batch_size": engine.max_batch_size,
        # requests are joined along dimension 0 (Triton's batch dimension)
        "batch_dimension": issubclass(engine, TensorEngine) and engine.max_batch_size > 1,
        "async": inspect.iscoroutinefunction(
            engine.infer_batch if engine.max_batch_size > 1 else engine.infer
        )
        or inspect.isasyncgenfunction(engine.infer),
        "streaming": engine.is_streaming(),
        "warmup": engine.warmup,
    }


# Core-schema steps that take inputs the JSON schema does not describe: validators that run
# before (or instead of) pydantic's own, and string transforms that run before length checks.
_OPAQUE_TYPES = {"function-before", "function-wrap", "function-plain"}
_OPAQUE_KEYS = {"strip_whitespace", "to_lower", "to_upper"}
_OPAQUE_CONFIG = {"validate_by_name", "populate_by_name", *(f"str_{k}" for k in _OPAQUE_KEYS)}


def schema_is_exact(model: type[BaseModel]) -> bool:
    """Whether ``model``'s JSON schema rejects nothing the model accepts (bar pydantic's lax
    coercions, which the runtime allows for), so the runtime may refuse a body by the schema
    alone: no before/wrap/plain validator, no field accepted under a second name."""
    stack: list[Any] = [model.__pydantic_core_schema__]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")  # a dict where a field is named "type"
            if isinstance(kind, str) and kind in _OPAQUE_TYPES:
                return False
            if any(node.get(key) is True for key in _OPAQUE_KEYS):
                return False
            config = node.get("config")
            if isinstance(config, dict) and any(config.get(k) is True for k in _OPAQUE_CONFIG):
                return False
            if isinstance(node.get("validation_alias"), list):  # AliasChoices, AliasPath
                return False
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return True


def _validated_by(engine: type[Engine], model: type[BaseModel]) -> bool:
    """Whether the worker validates an /ai/run body with ``model`` (a tensor engine without
    ``preprocess`` decodes its tensors its own way)."""
    return not issubclass(engine, TensorEngine) or engine.has_preprocess()


def discover(package_dir: Path, registered: list[str] | None = None) -> dict[str, Any]:
    """Describe the package's engines; ``registered`` gets their names as they register."""
    plugins = EnginePlugins()
    name = plugins.load_package(package_dir)
    engines = plugins.engines(registered)
    if not engines:
        raise PackageError(f"package {package_dir} ({name}) registers no engine")
    result = {"package": name, "engines": [describe(e) for e in engines]}
    if plugins.version is not None:  # the installed distribution it serves ([tool.omni])
        result["version"] = plugins.version
    return result


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
