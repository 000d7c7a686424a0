"""The all-MiniLM-L6-v2 example, served, against sentence-transformers called directly."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.embeddings import TEXTS, cosines
from tests.e2e.runtime import RunningRuntime

MODEL = "@cf/sentence-transformers/all-minilm-l6-v2"

pytestmark = pytest.mark.slow


def test_ai_run_matches_the_library(examples: RunningRuntime, reference: np.ndarray) -> None:
    response = httpx.post(f"{examples.url}/ai/run/{MODEL}", json={"text": TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["shape"] == [3, 384]
    assert cosines(np.array(result["data"]), reference).min() >= 0.999
    single = httpx.post(f"{examples.url}/ai/run/{MODEL}", json={"text": TEXTS[0]}, timeout=60)
    assert single.json()["result"]["shape"] == [1, 384]


def test_tritonclient_matches_the_library(examples: RunningRuntime, reference: np.ndarray) -> None:
    client = triton.InferenceServerClient(examples.host_port)
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    result = client.infer(MODEL, [text])
    vectors = result.as_numpy("data")
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert cosines(vectors, reference).min() >= 0.999
    assert result.as_numpy("shape").tolist() == [3, 384]


def test_concurrent_requests_are_batched_and_correct(
    examples: RunningRuntime, reference: np.ndarray
) -> None:
    import concurrent.futures

    def one(i: int) -> list[float]:
        response = httpx.post(
            f"{examples.url}/ai/run/{MODEL}", json={"text": TEXTS[i % 3]}, timeout=60
        )
        return response.json()["result"]["data"][0]  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        vectors = list(pool.map(one, range(24)))
    expected = np.array([reference[i % 3] for i in range(24)])
    assert cosines(np.array(vectors), expected).min() >= 0.999
