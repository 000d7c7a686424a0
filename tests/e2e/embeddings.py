"""What the embedding examples' tests share."""

from __future__ import annotations

import numpy as np

# Texts the example models embed in the tests.
TEXTS = ["Omni serves many models on few GPUs.", "A cat sat on the mat.", "Ünïcödé text, too"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two matrices of vectors."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)  # type: ignore[no-any-return]
