"""``GET /openapi.json``: every model's Workers-AI-style schema and its v2 tensors."""

from __future__ import annotations

import copy
import re
from typing import Any

from omni_runtime.discovery import ModelSpec

__all__ = ["build_openapi"]

_ENVELOPE_ERRORS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        "required": ["code", "message"],
    },
}


def _component_name(model: str, schema: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model.strip("@")) + "__" + schema


def _hoist(schema: dict[str, Any], model: str, components: dict[str, Any]) -> dict[str, Any]:
    """Move pydantic's ``$defs`` to ``components/schemas`` under model-specific names."""
    schema = copy.deepcopy(schema)
    defs = schema.pop("$defs", {})

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                node["$ref"] = "#/components/schemas/" + _component_name(model, ref[8:])
            for value in node.values():
                rewrite(value)
        elif isinstance(node, list):
            for value in node:
                rewrite(value)
        return node

    for name, definition in defs.items():
        components[_component_name(model, name)] = rewrite(definition)
    return rewrite(schema)  # type: ignore[no-any-return]


def _tensor_table(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in tensors)


def build_openapi(models: list[ModelSpec], version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for spec in models:
        request = _hoist(spec.input_schema, spec.name, components)
        result = _hoist(spec.output_schema, spec.name, components)
        paths[f"/ai/run/{spec.name}"] = {
            "post": {
                "summary": f"Run {spec.name}" + (f" ({spec.task})" if spec.task else ""),
                "description": spec.description,
                "tags": ["Workers AI"],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": request}},
                },
                "responses": {
                    "200": {
                        "description": "The model's answer in the Workers AI envelope",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "result": result,
                                        "success": {"type": "boolean"},
                                        "errors": _ENVELOPE_ERRORS,
                                        "messages": {"type": "array", "items": {"type": "string"}},
                                    },
                                }
                            }
                        },
                    },
                    "400": {"description": "Invalid input; the message names the field"},
                    "429": {"description": "Queue full (code 3040)"},
                    "503": {"description": "Model unavailable; see Retry-After"},
                },
            }
        }
        paths[f"/v2/models/{spec.name}/infer"] = {
            "post": {
                "summary": f"KServe v2 inference on {spec.name}",
                "description": (
                    f"Inputs: {_tensor_table(spec.inputs)}. "
                    f"Outputs: {_tensor_table(spec.outputs)}. "
                    "JSON, or the binary tensor extension with Inference-Header-Content-Length."
                ),
                "tags": ["KServe v2"],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": {"description": "Output tensors"}},
            }
        }
    for path, summary in (
        ("/v2/health/live", "Liveness"),
        ("/v2/health/ready", "Readiness: every model is ready"),
        ("/v2", "Server metadata"),
        ("/metrics", "Prometheus metrics"),
    ):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Omni", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
