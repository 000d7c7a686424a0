"""Joins @remote/scale, served by another runtime, to this one (its URL from the environment)."""

from __future__ import annotations

import os
from typing import Any

from omni_engine_triton import TritonEngine
from omni_sdk import hookimpl


class Forwarded(TritonEngine):
    name = "@local/scale"
    url = os.environ.get("OMNI_TEST_REMOTE_URL", "http://127.0.0.1:9")
    remote_model = "@remote/scale"


@hookimpl
def register_engines(register: Any) -> None:
    register(Forwarded)
