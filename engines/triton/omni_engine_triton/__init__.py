"""TritonEngine: forward an Omni model to an existing Triton or KServe v2 server."""

from __future__ import annotations

from omni_engine_triton._engine import TritonEngine

__all__ = ["TritonEngine"]
