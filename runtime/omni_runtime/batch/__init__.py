"""The durable asynchronous batch queue (Workers AI's ``queueRequest``)."""

from __future__ import annotations

from omni_runtime.batch.runner import BatchRunner
from omni_runtime.batch.store import (
    AsyncBatchStore,
    BatchItem,
    BatchStatus,
    BatchStore,
    BatchStoreUnavailable,
    InThread,
    SqliteBatchStore,
)

__all__ = [
    "AsyncBatchStore",
    "BatchItem",
    "BatchRunner",
    "BatchStatus",
    "BatchStore",
    "BatchStoreUnavailable",
    "InThread",
    "SqliteBatchStore",
]
