"""The durable asynchronous batch queue (Workers AI's ``queueRequest``)."""

from __future__ import annotations

from omni_runtime.batch.runner import BatchRunner
from omni_runtime.batch.store import BatchItem, BatchStatus, BatchStore, SqliteBatchStore

__all__ = ["BatchItem", "BatchRunner", "BatchStatus", "BatchStore", "SqliteBatchStore"]
