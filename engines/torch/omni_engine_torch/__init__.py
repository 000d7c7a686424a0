"""TorchEngine: serve a PyTorch model with Omni (TorchScript, torch.export, or module + weights)."""

from __future__ import annotations

from omni_engine_torch._engine import TorchEngine, install_cuda_allocator

__all__ = ["TorchEngine", "install_cuda_allocator"]
