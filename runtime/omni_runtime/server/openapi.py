"""``GET /openapi.json``: every model's Workers-AI-style schema and its v2 tensors.

The v2 infer body is described per model down to each tensor (its name, datatype, shape and
the JSON elements its data holds), so a schema-driven client or fuzzer builds requests that
reach the model's own decoder rather than stopping at a generic object.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from omni_runtime.discovery import ModelSpec

__all__ = ["build_openapi"]

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
_INT_BITS = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}
_UINT_BITS = {"UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
_FLOAT_NAMES = ["NaN", "Infinity", "-Infinity"]

_ENVELOPE_ERRORS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        "required": ["code", "message"],
    },
}
_MESSAGES = {"type": "array", "items": {"type": "string"}}
_REF = "#/components/schemas/"

# Shared v2 shapes, in components/schemas.
_V2_SCHEMAS: dict[str, Any] = {
    "v2.Datatype": {"type": "string", "enum": DATATYPES},
    "v2.Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "v2.RequestParameters": {
        "type": "object",
        "description": "binary_data_output: every output as binary data after the JSON header",
        "properties": {"binary_data_output": {"type": "boolean"}},
        "additionalProperties": True,
    },
    "v2.TensorParameters": {
        "type": "object",
        "description": "binary_data_size: this input's bytes follow the JSON header (binary "
        "tensor extension; the header's length is in Inference-Header-Content-Length)",
        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        "additionalProperties": True,
    },
    "v2.OutputTensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"$ref": _REF + "v2.Datatype"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {
                "type": "array",
                "description": 'flat, row-major; NaN and ±inf as "NaN", "Infinity", "-Infinity"',
                "items": {"type": ["number", "integer", "boolean", "string"]},
            },
            "parameters": {"$ref": _REF + "v2.TensorParameters"},
        },
        "required": ["name", "datatype", "shape"],
    },
    "v2.InferenceResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": _REF + "v2.OutputTensor"}},
        },
        "required": ["model_name", "outputs"],
    },
    "v2.TensorMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"$ref": _REF + "v2.Datatype"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        },
        "required": ["name", "datatype", "shape"],
    },
    "v2.ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": _REF + "v2.TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": _REF + "v2.TensorMetadata"}},
        },
        "required": ["name", "platform", "inputs", "outputs"],
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
                node["$ref"] = _REF + _component_name(model, ref[8:])
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


def _element(datatype: str) -> dict[str, Any]:
    """The JSON schema of one element of a tensor's ``data``."""
    if datatype in _INT_BITS:
        bits = _INT_BITS[datatype]
        return {"type": "integer", "minimum": -(1 << (bits - 1)), "maximum": (1 << (bits - 1)) - 1}
    if datatype in _UINT_BITS:
        return {"type": "integer", "minimum": 0, "maximum": (1 << _UINT_BITS[datatype]) - 1}
    if datatype.startswith("FP"):
        return {"anyOf": [{"type": "number"}, {"type": "string", "enum": _FLOAT_NAMES}]}
    if datatype == "BOOL":
        return {"type": "boolean"}
    return {"type": "string"}


def _input_tensor(tensor: dict[str, Any]) -> dict[str, Any]:
    """One input of one model: its name, datatype, shape (by dimension) and data."""
    element = _element(tensor["datatype"])
    dims = [
        {"type": "integer", "minimum": 0} if d == -1 else {"type": "integer", "enum": [d]}
        for d in tensor["shape"]
    ]
    return {
        "type": "object",
        "description": f"{tensor['name']} {tensor['datatype']} {tensor['shape']} (-1: any size)",
        "properties": {
            "name": {"type": "string", "enum": [tensor["name"]]},
            "datatype": {"type": "string", "enum": [tensor["datatype"]]},
            "shape": {
                "type": "array",
                "prefixItems": dims,
                "minItems": len(dims),
                "maxItems": len(dims),
            },
            "data": {
                "type": "array",
                "description": "flat (row-major) or nested",
                "items": {"anyOf": [element, {"type": "array", "items": element}]},
            },
            "parameters": {"$ref": _REF + "v2.TensorParameters"},
        },
        "required": ["name", "datatype", "shape", "data"],
    }


def _v2_request(spec: ModelSpec) -> dict[str, Any]:
    outputs = [t["name"] for t in spec.outputs]
    inputs: dict[str, Any] = {
        "type": "array",
        "description": "each input at most once; the required ones always",
        "items": {"oneOf": [_input_tensor(t) for t in spec.inputs]},
    }
    required = [t["name"] for t in spec.inputs if not t.get("optional")]
    if required:
        inputs["allOf"] = [
            {"contains": {"type": "object", "properties": {"name": {"enum": [name]}}}}
            for name in required
        ]
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "echoed in the response"},
            "parameters": {"$ref": _REF + "v2.RequestParameters"},
            "inputs": inputs,
            "outputs": {
                "type": "array",
                "description": "the outputs to return (default: all)",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": outputs},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data": {"type": "boolean"}},
                            "additionalProperties": True,
                        },
                    },
                    "required": ["name"],
                },
            },
        },
        "required": ["inputs"],
    }


def _errors(schema: dict[str, Any], statuses: dict[str, str]) -> dict[str, Any]:
    return {
        status: {"description": text, "content": {"application/json": {"schema": schema}}}
        for status, text in statuses.items()
    }


def _ai_envelope(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "result": result,
            "success": {"type": "boolean"},
            "errors": _ENVELOPE_ERRORS,
            "messages": _MESSAGES,
        },
        "required": ["result", "success", "errors", "messages"],
    }


def _model_paths(spec: ModelSpec, components: dict[str, Any], auth: bool) -> dict[str, Any]:
    request = _hoist(spec.input_schema, spec.name, components)
    result = _hoist(spec.output_schema, spec.name, components)
    v2_error = {"$ref": _REF + "v2.Error"}
    ai_error = _ai_envelope({"type": "null"})
    unauthorized = {"401": "No or wrong bearer token (WWW-Authenticate: Bearer)"} if auth else {}
    v2_name = _component_name(spec.name, "v2.InferenceRequest")
    components[v2_name] = _v2_request(spec)
    metadata = {
        "200": {
            "description": "Model metadata",
            "content": {"application/json": {"schema": {"$ref": _REF + "v2.ModelMetadata"}}},
        },
        **_errors(v2_error, unauthorized),
    }
    plain = {"200": {"description": "OK"}, **_errors(v2_error, unauthorized)}
    return {
        f"/ai/run/{spec.name}": {
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
                        "content": {"application/json": {"schema": _ai_envelope(result)}},
                    },
                    **_errors(
                        ai_error,
                        {
                            "400": "Invalid input; the message names the field (code 5006)",
                            **unauthorized,
                            "408": "The body did not arrive within server.body_timeout",
                            "413": "Body larger than server.max_body_size (code 3006)",
                            "429": "Queue full, or rejectIfBusy met a busy model (code 3040)",
                            "500": "The model failed (code 3043)",
                            "503": "Model unavailable; see Retry-After (code 3042)",
                        },
                    ),
                },
            }
        },
        f"/v2/models/{spec.name}/infer": {
            "post": {
                "summary": f"KServe v2 inference on {spec.name}",
                "description": (
                    f"Inputs: {_tensor_table(spec.inputs)}. "
                    f"Outputs: {_tensor_table(spec.outputs)}. "
                    "JSON, or the binary tensor extension: the JSON header, then each binary "
                    "input's bytes in order, with the header's length in "
                    "Inference-Header-Content-Length."
                ),
                "tags": ["KServe v2"],
                "parameters": [
                    {
                        "name": "Inference-Header-Content-Length",
                        "in": "header",
                        "required": False,
                        "description": "length of the JSON header when binary data follows it",
                        "schema": {"type": "integer", "minimum": 0},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF + v2_name}},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": "Output tensors (binary ones after the JSON header)",
                        "content": {
                            "application/json": {"schema": {"$ref": _REF + "v2.InferenceResponse"}},
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    **_errors(
                        v2_error,
                        {
                            "400": "Malformed request; the message names the model and tensor",
                            **unauthorized,
                            "408": "The body did not arrive within server.body_timeout",
                            "413": "Body larger than server.max_body_size",
                            "429": "The model's queue is full",
                            "500": "The model failed, or returned a bad response",
                            "503": "Model unavailable; see Retry-After",
                        },
                    ),
                },
            }
        },
        f"/v2/models/{spec.name}": {
            "get": {"summary": f"Metadata of {spec.name}", "responses": metadata}
        },
        f"/v2/models/{spec.name}/ready": {
            "get": {
                "summary": f"200 if {spec.name} is ready, else 400",
                "responses": {**plain, "400": {"description": "Not ready"}},
            }
        },
        f"/v2/models/{spec.name}/config": {
            "get": {"summary": f"Triton-style config of {spec.name}", "responses": plain}
        },
        f"/v2/models/{spec.name}/stats": {
            "get": {"summary": f"Statistics of {spec.name}", "responses": plain}
        },
    }


def build_openapi(models: list[ModelSpec], version: str, auth: bool = False) -> dict[str, Any]:
    """The document; with ``auth``, routes say which need a bearer token."""
    components: dict[str, Any] = copy.deepcopy(_V2_SCHEMAS)
    paths: dict[str, Any] = {}
    for spec in models:
        paths.update(_model_paths(spec, components, auth))
    for path, summary in (
        ("/v2/health/live", "Liveness"),
        ("/v2/health/ready", "Readiness: every model is ready"),
        ("/metrics", "Prometheus metrics"),
    ):
        paths[path] = {
            "get": {
                "summary": summary,
                "responses": {"200": {"description": "OK"}},
                **({"security": []} if auth else {}),
            }
        }
    paths["/v2"] = {
        "get": {"summary": "Server metadata", "responses": {"200": {"description": "OK"}}}
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Omni", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
