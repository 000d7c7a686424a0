"""The official openai client against the runtime's /v1 routes."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import FIXTURES
from tests.e2e.embeddings import TEXTS, cosines
from tests.e2e.runtime import RunningRuntime, serve

MINILM = "@cf/sentence-transformers/all-minilm-l6-v2"


@pytest.fixture(scope="module")
def words() -> Iterator[RunningRuntime]:
    with serve(FIXTURES / "packages" / "stream-models") as running:
        yield running


def _client(runtime: RunningRuntime) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{runtime.url}/v1", api_key="unused", max_retries=0)


def test_embeddings_match_sentence_transformers(
    examples: RunningRuntime, reference: np.ndarray
) -> None:
    client = _client(examples)
    # Left to itself the client asks for base64 and decodes it; "float" is plain JSON.
    for encoding in (openai.NOT_GIVEN, "float"):
        response = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format=encoding)
        vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert vectors.shape == (len(TEXTS), 384)
        assert cosines(vectors, reference).min() >= 0.999
    raw = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    assert cosines(np.array(decoded), reference).min() >= 0.999
    single = client.embeddings.create(model=MINILM, input=TEXTS[0])
    assert len(single.data) == 1 and single.model == MINILM


def test_chat_completion(words: RunningRuntime) -> None:
    client = _client(words)
    completion = client.chat.completions.create(
        model="@test/words",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=3,
    )
    assert completion.choices[0].message.content == "hello there hello "
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["@test/words", "@test/async-words"])
def test_chat_completion_streamed(words: RunningRuntime, model: str) -> None:
    client = _client(words)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
        max_tokens=4,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "a b a b "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_streamed_and_not(words: RunningRuntime) -> None:
    client = _client(words)
    completion = client.completions.create(model="@test/words", prompt="x y", max_tokens=3)
    assert completion.choices[0].text == "x y x "
    stream = client.completions.create(model="@test/words", prompt="x y", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "x y x "


def test_models_and_errors_in_openais_shape(words: RunningRuntime) -> None:
    client = _client(words)
    assert {m.id for m in client.models.list()} == {"@test/words", "@test/async-words"}
    with pytest.raises(openai.NotFoundError, match="'@test/nope' does not exist"):
        client.chat.completions.create(
            model="@test/nope", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="is a text-generation model"):
        client.embeddings.create(model="@test/words", input="x")
    response = httpx.post(f"{words.url}/v1/chat/completions", json={"model": "@test/words"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
