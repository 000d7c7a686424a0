"""An ``/ai/run`` body checked against the model's JSON schema before a cold start.

While a model has no replica ready, a body that its input model would refuse is answered 400 at
once instead of after the model starts. The schema comes from discovery; the check is lenient
wherever pydantic is (``"3"`` for an integer, ``1`` for a boolean, a number for a date), so it
refuses only what the worker would refuse too, and the worker still validates everything that
passes. A ready replica validates in the worker alone: nothing here runs on the hot path.
"""

from __future__ import annotations

import copy
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

__all__ = ["InputCheck", "lenient_schema"]

# What pydantic's lax mode turns into each JSON schema type from JSON input.
_LAX_TYPES = {
    "integer": ["integer", "number", "string", "boolean"],
    "number": ["number", "integer", "string", "boolean"],
    "boolean": ["boolean", "integer", "number", "string"],
}
_FROM_NUMBERS = {"date-time", "date", "time", "duration"}  # pydantic takes a number for these
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
_MANY = ("anyOf", "allOf", "oneOf", "prefixItems")
_NAMED = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_ORIGINAL_TYPE = "x-omni-type"  # the type before widening, for the message
_MOST_PROBLEMS = 3


def lenient_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` widened to what pydantic accepts: lax types, no regex (pydantic's dialect is
    Rust's), no uniqueness (a set takes duplicates), ``anyOf`` for ``oneOf`` (a widened value
    may match two branches), no ``enum`` of non-strings (``"1"`` is a valid ``1``)."""
    schema = copy.deepcopy(schema)
    _widen(schema)
    return schema


def _widen(node: Any) -> None:
    if not isinstance(node, dict):
        return
    for key in ("pattern", "uniqueItems", "format"):
        if key == "format" and node.get("format") in _FROM_NUMBERS:
            node.pop("type", None)
        node.pop(key, None)
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    if any(k in _LAX_TYPES for k in kinds):
        node[_ORIGINAL_TYPE] = kind
        node["type"] = list(dict.fromkeys(w for k in kinds for w in _LAX_TYPES.get(k, [k])))
    for key in ("enum", "const"):
        values = node.get("enum") if key == "enum" else [node.get(key)]
        if key in node and not all(isinstance(v, str) for v in values or []):
            del node[key]
    if "oneOf" in node:
        node["anyOf"] = node.pop("oneOf")
    for key in _ONE:
        _widen(node.get(key))
    for key in _MANY:
        for child in node.get(key) or []:
            _widen(child)
    for key in _NAMED:
        for child in (node.get(key) or {}).values():
            _widen(child)


class InputCheck:
    """The checks one model's body gets while the model has no replica ready."""

    def __init__(self, model: str, schema: dict[str, Any]) -> None:
        self.model = model
        self._validator = Draft202012Validator(lenient_schema(schema))

    def problem(self, body: dict[str, Any]) -> str:
        """Why the model would refuse ``body``, naming the fields, or ""."""
        body = {k: v for k, v in body.items() if k != "options"}  # the worker drops it too
        try:
            errors = sorted(self._validator.iter_errors(body), key=_where)
        except RecursionError:
            return ""  # the worker decides
        if not errors:
            return ""
        parts = [_describe(e) for e in errors[:_MOST_PROBLEMS]]
        if len(errors) > _MOST_PROBLEMS:
            parts.append(f"and {len(errors) - _MOST_PROBLEMS} more")
        return f"model '{self.model}': " + "; ".join(parts)


def _describe(error: ValidationError) -> str:
    """``input 'count': expected integer, got an array``, as the worker's messages read."""
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator in ("anyOf", "allOf") and error.context:
        return _describe(best_match(error.context))
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        return f"input '{_join(where, missing[0] if missing else '?')}': Field required"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"input '{_join(where, extra[0] if extra else '?')}': Extra inputs are not permitted"
    if error.validator == "type":
        wanted = error.schema.get(_ORIGINAL_TYPE, error.validator_value)
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"input '{where or '(root)'}': expected {wanted}, got {_kind(error.instance)}"
    return f"input '{where or '(root)'}': {error.message}"


def _where(error: ValidationError) -> list[str]:
    return [str(p) for p in error.absolute_path]


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _kind(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }
    return kinds.get(type(value), type(value).__name__)
