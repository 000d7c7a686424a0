"""Schemathesis against a real runtime's /openapi.json: every operation of every fixture model,
with schema-valid and schema-breaking requests, a fixed budget, the same cases every run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.e2e.runtime import RunningRuntime
from tests.fuzz.conftest import AUTH, MODELS, check_answer

ROUTES = [
    ("POST", "/ai/run/{}"),
    ("POST", "/v2/models/{}/infer"),
    ("GET", "/v2/models/{}"),
    ("GET", "/v2/models/{}/config"),
]
# Cases per operation and mode: 6 POST operations x (60 + 30), 6 GET x (10 + 10): 660 requests.
BUDGET = {("POST", GenerationMode.POSITIVE): 60, ("POST", GenerationMode.NEGATIVE): 30}


@pytest.fixture(scope="module")
def schema(fuzz_runtime: RunningRuntime) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_runtime.url}/openapi.json", headers=AUTH)


def _fuzz(
    operation: Any, mode: GenerationMode, examples: int, check: Callable[[Any], None]
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # a fixed budget: no shrinking
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: Any) -> None:
        check(case)

    run()


@pytest.mark.parametrize(("method", "route"), ROUTES)
@pytest.mark.parametrize("model", MODELS)
def test_no_request_from_the_schema_gets_a_runtime_5xx(
    schema: Any, fuzz_runtime: RunningRuntime, method: str, route: str, model: str
) -> None:
    operation = schema[route.format(model)][method]

    def check(case: Any) -> None:
        headers = {**(case.headers or {}), **AUTH}
        response = case.call(headers=headers, timeout=30)
        length = response.headers.get("inference-header-content-length") or ["0"]
        check_answer(
            response.status_code,
            int(length[0]),
            response.content,
            f"{method} {case.formatted_path} {case.body!r}"[:2000],
        )

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzz(operation, mode, BUDGET.get((method, mode), 10), check)
