"""OnnxEngine: serve an ONNX graph with onnxruntime through Omni."""

from __future__ import annotations

from omni_engine_onnx._engine import OnnxEngine, cuda_usable, tensors_of_session

__all__ = ["OnnxEngine", "cuda_usable", "tensors_of_session"]
