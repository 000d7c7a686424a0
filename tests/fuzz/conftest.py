"""One runtime for the fuzzers: the tensor fixture models, an API token, default limits.

Every fuzz test holds the runtime to the same rules: no 5xx of its own (an undecodable
request is a 4xx), a 500 only with the documented message of an engine that failed or
returned something unencodable, JSON bodies that strict parsers read, and no worker death.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import RunningRuntime, serve, worker_deaths

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ("@test/identity", "@test/numbers", "@test/everything")
# What docs/http-api.md lists for a 500: the engine raised, or returned a bad response.
ENGINE_FAILURE = re.compile(r"^model '@test/[a-z]+' (failed: |returned a bad response: )")


@pytest.fixture(scope="session")
def fuzz_runtime() -> Iterator[RunningRuntime]:
    package = FIXTURES / "packages" / "tensor-models"
    with (
        serve(package, env={"OMNI_API_TOKEN": TOKEN}) as running,
        httpx.Client(base_url=running.url, timeout=30) as http,
    ):
        deaths = worker_deaths(http.get("/metrics").text)
        yield running
        assert worker_deaths(http.get("/metrics").text) == deaths, "a worker died"


def _strict_json(text: str | bytes) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def check_answer(status: int, header_length: int, body: bytes, request: str) -> None:
    """The rules every answer to a fuzzed request must keep (see the module docstring);
    ``header_length``: the answer's Inference-Header-Content-Length, 0 if none."""
    document = _strict_json(body[: header_length or len(body)]) if body else None
    if status >= 500:
        assert status == 500, f"{status} for {request}: {body[:500]!r}"
        assert isinstance(document, dict)
        message = document.get("error") or document["errors"][0]["message"]
        assert ENGINE_FAILURE.match(message), f"runtime 500 for {request}: {message}"
    if header_length and status == 200:
        assert isinstance(document, dict)
        sizes = [
            (o.get("parameters") or {}).get("binary_data_size", 0) for o in document["outputs"]
        ]
        assert header_length + sum(sizes) == len(body), f"binary outputs misframed: {request}"
