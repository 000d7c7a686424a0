"""TorchEngine on a real GPU allocates through libomnicuda; skipped unless cuInit succeeds."""

from __future__ import annotations

import logging

import pytest


def test_torch_engine_allocates_through_the_pool() -> None:
    import torch

    import omni_cstub
    from omni_engine_torch import install_cuda_allocator
    from omni_sdk import LoadContext

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    hooks = omni_cstub.Hooks()
    before = hooks.usage().used
    ctx = LoadContext(model_name="gpu-test", device="cuda", logger=logging.getLogger("gpu"))
    pool = install_cuda_allocator(ctx)
    assert pool is not None
    with torch.cuda.use_mem_pool(pool):
        weights = torch.ones(64 << 20, device="cuda", dtype=torch.uint8)
    assert hooks.usage().used >= before + (64 << 20)
    assert int(weights.sum().item()) == 64 << 20
