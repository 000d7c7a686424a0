"""The answer envelopes of both APIs, written by the worker and by the runtime alike.

Workers AI style (``/ai/run``, docs/http-api.md)::

    {"result": ..., "success": true, "errors": [], "messages": []}
    {"result": null, "success": false, "errors": [{"code": 5006, "message": "..."}], "messages": []}

KServe v2: an error is ``{"error": "..."}``. A worker's RESPONSE body (``omni_sdk.wire``) is
already one of these, so the runtime forwards it untouched; the runtime writes the same bodies
for the errors it finds itself (unknown model, full queue, a worker gone).
"""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

__all__ = [
    "AI_ERROR_CODES",
    "RESULT_CLOSE",
    "RESULT_OPEN",
    "ai_error_body",
    "dump_json",
    "v2_error_body",
]

# Workers-AI-style error codes, by HTTP status (docs/http-api.md).
AI_ERROR_CODES = {
    400: 5006,
    401: 10000,
    404: 5007,
    408: 3007,
    413: 3006,
    429: 3040,
    431: 3006,
    500: 3043,
    503: 3042,
}
# A successful /ai/run answer is RESULT_OPEN + the result's JSON + RESULT_CLOSE.
RESULT_OPEN = b'{"result":'
RESULT_CLOSE = b',"success":true,"errors":[],"messages":[]}'


def ai_error_body(status: int, message: str) -> bytes:
    """The ``/ai/run`` envelope of a failure with HTTP ``status``; its code from
    ``AI_ERROR_CODES`` (3043, an internal error, for a status not listed)."""
    return json.dumps(
        {
            "result": None,
            "success": False,
            "errors": [{"code": AI_ERROR_CODES.get(status, 3043), "message": message}],
            "messages": [],
        }
    ).encode()


def v2_error_body(message: str) -> bytes:
    """The KServe v2 body of a failure: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def dump_json(value: Any) -> bytes:
    """Compact JSON; NaN and ±inf as "NaN", "Infinity", "-Infinity" (protobuf's JSON mapping)."""
    return pydantic_core.to_json(value, inf_nan_mode="strings")
