"""all-MiniLM-L6-v2 sentence embeddings through ``TorchEngine``.

    curl -X POST http://127.0.0.1:8000/ai/run/@cf/sentence-transformers/all-minilm-l6-v2-torch \
         -d '{"text": ["Omni serves many models", "on few GPUs"]}'

``/ai/run`` takes text (tokenised in ``preprocess``); KServe v2 clients send the token ids
and attention mask themselves and get the pooled, unit-length embeddings back.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from numpy.typing import NDArray

from omni_engine_torch import TorchEngine
from omni_example_minilm_torch._text import (
    EmbeddingRequest,
    EmbeddingResponse,
    model_dir,
    tokenizer,
)
from omni_sdk import LoadContext, Resources, Scaling, Tensor, hookimpl

__all__ = ["MeanPooledBert", "MiniLMTorch"]


class MeanPooledBert(torch.nn.Module):
    """BERT, then mean pooling over the real tokens, then L2 normalisation."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


class MiniLMTorch(TorchEngine):
    """Sentence embeddings (384 dimensions) from all-MiniLM-L6-v2, run by TorchEngine."""

    name = "@cf/sentence-transformers/all-minilm-l6-v2-torch"
    task = "text-embeddings"
    resources = Resources(memory="1GiB", cpus=1.0)
    scaling = Scaling(max_replicas=2)
    max_batch_size = 32  # rows (texts) per forward pass, across requests that arrive together

    inputs = (
        Tensor("input_ids", "INT64", (-1, -1), pad=0),
        Tensor("attention_mask", "INT64", (-1, -1), pad=0),
    )
    outputs = (Tensor("embeddings", "FP32", (-1, 384)),)
    weights_file = str(model_dir() / "model.safetensors")

    def build_module(self) -> torch.nn.Module:
        from transformers import BertConfig

        config = BertConfig(**json.loads((model_dir() / "config.json").read_text()))
        return MeanPooledBert(config)

    def adapt_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The file holds a bare BertModel (with its pooler, which mean pooling does not use).
        return {
            f"bert.{key}": value
            for key, value in weights.items()
            if not key.startswith("pooler.") and key != "embeddings.position_ids"
        }

    def load(self, ctx: LoadContext) -> None:
        super().load(ctx)
        self.tokenizer = tokenizer()

    def preprocess(self, request: EmbeddingRequest) -> dict[str, NDArray[Any]]:
        return self.tokenizer.encode(request.text)

    def postprocess(
        self, outputs: dict[str, NDArray[Any]], request: EmbeddingRequest
    ) -> EmbeddingResponse:
        vectors = outputs["embeddings"]
        return EmbeddingResponse(shape=list(vectors.shape), data=vectors.tolist())


@hookimpl
def register_engines(register: Any) -> None:
    register(MiniLMTorch)
