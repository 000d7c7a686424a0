"""The Engine contract, checked in-process with omni_sdk.testing."""

from __future__ import annotations

import array
import json
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from omni_sdk import Engine, EngineDefinitionError, LoadContext, hookimpl
from omni_sdk._plugins import EnginePlugins, iter_engines
from omni_sdk._serving import EngineRunner
from omni_sdk.testing import EngineCallError, EngineTester


class Req(BaseModel):
    text: str


class Resp(BaseModel):
    label: str
    score: float


class Sentiment(Engine):
    name = "@cf/acme/sentiment"
    task = "text-classification"

    def load(self, ctx: LoadContext) -> None:
        self.positive = {"great", "good"}

    def infer(self, request: Req) -> Resp:
        good = request.text in self.positive
        return Resp(label="positive" if good else "negative", score=0.9 if good else 0.1)


class AsyncSentiment(Sentiment):
    name = "@cf/acme/async-sentiment"

    async def infer(self, request: Req) -> Resp:  # type: ignore[override]
        return Resp(label="async", score=1.0)


def test_run_and_v2_go_through_the_same_engine() -> None:
    with EngineTester(Sentiment) as tester:
        assert tester.run({"text": "great"}) == {"label": "positive", "score": 0.9}
        response = tester.infer_v2(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["meh"]}]}
        )
        outputs = {o["name"]: o for o in response["outputs"]}
        assert outputs["label"]["data"] == ["negative"]
        assert outputs["score"] == {
            "name": "score",
            "datatype": "FP32",
            "shape": [1],
            "data": [0.1],
        }


def test_async_engines() -> None:
    with EngineTester(AsyncSentiment) as tester:
        assert tester.run({"text": "x"})["label"] == "async"


def test_invalid_input_is_400_naming_the_field() -> None:
    with EngineTester(Sentiment) as tester, pytest.raises(EngineCallError) as info:
        tester.run({"txt": "great"})
    assert info.value.status == 400
    assert "model '@cf/acme/sentiment': input 'text': Field required" in str(info.value)


def test_binary_outputs_are_requested_per_output() -> None:
    tester = EngineTester(Sentiment)
    request = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["good"]}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}],
    }
    prepared = tester.runner.prepare_v2(json.dumps(request).encode(), 0)
    status, header_length, parts = tester.runner.respond(prepared, tester.runner.run([prepared])[0])
    body = b"".join(parts)
    header = json.loads(body[:header_length])
    assert status == 200
    assert header["outputs"] == [
        {"name": "score", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
    ]
    assert array.array("f", body[header_length:]).tolist() == pytest.approx([0.9])


def test_batching_engine_gets_lists() -> None:
    class Batched(Engine):
        name = "batched"
        max_batch_size = 4

        def infer_batch(self, requests: list[Req]) -> list[Resp]:
            return [Resp(label=r.text, score=len(requests)) for r in requests]

    runner = EngineRunner(Batched())
    prepared = [runner.prepare_json(json.dumps({"text": str(i)}).encode()) for i in range(6)]
    outcomes = runner.run(prepared)
    assert [o.score for o in outcomes] == [4, 4, 4, 4, 2, 2]


def test_batch_returning_the_wrong_count_fails_every_request_in_it() -> None:
    class Short(Engine):
        name = "short"
        max_batch_size = 4

        def infer_batch(self, requests: list[Req]) -> list[Resp]:
            return []

    runner = EngineRunner(Short())
    prepared = [runner.prepare_json(b'{"text": "a"}'), runner.prepare_json(b'{"text": "b"}')]
    responses = runner.respond_all(prepared, runner.run(prepared))
    assert [status for status, _, _ in responses] == [500, 500]
    assert b"infer_batch returned 0 items for 2 requests" in responses[0][2][0]


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"infer": lambda self, r: r}, "must set `name`"),
        ({"name": "a b", "infer": lambda self, r: r}, "may not contain spaces"),
        ({"name": "x"}, "must implement infer"),
        (
            {"name": "x", "max_batch_size": 4, "infer": Sentiment.infer},
            "does not implement infer_batch",
        ),
        ({"name": "x", "infer": lambda self, r: r}, "must annotate its request parameter"),
    ],
)
def test_bad_definitions_say_what_to_do(definition: dict[str, object], message: str) -> None:
    engine = type("Bad", (Engine,), definition)
    with pytest.raises(EngineDefinitionError, match=message):
        engine.validate_definition()


def test_non_pydantic_annotations_are_refused() -> None:
    class Plain(Engine):
        name = "plain"

        def infer(self, request: dict) -> dict:  # type: ignore[type-arg]
            return request

    with pytest.raises(EngineDefinitionError, match="must be a pydantic BaseModel subclass"):
        Plain.validate_definition()


class _Plugin:
    @hookimpl
    def register_engines(self, register):  # type: ignore[no-untyped-def]
        register(Sentiment)


def test_inline_plugins_register_engines() -> None:
    plugins = EnginePlugins()
    plugins.register(_Plugin(), name="inline")
    try:
        assert plugins.engines() == [Sentiment]
    finally:
        plugins.unregister("inline")
    assert plugins.engines() == []


def test_two_engines_with_one_name_are_refused() -> None:
    class Again(Sentiment):
        pass

    class Twice:
        @hookimpl
        def register_engines(self, register):  # type: ignore[no-untyped-def]
            register(Sentiment)
            register(Again)

    with pytest.raises(EngineDefinitionError, match="two engines are named '@cf/acme/sentiment'"):
        iter_engines([Twice()])


def test_a_misspelt_hook_fails_loudly() -> None:
    class Misspelt:
        @hookimpl
        def register_engine(self, register):  # type: ignore[no-untyped-def]
            register(Sentiment)

    plugins = EnginePlugins()
    plugins.register(Misspelt(), name="misspelt")
    with pytest.raises(Exception, match="register_engine"):
        plugins._pm.check_pending()


def test_allow_list_limits_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example package is installed by the setup script, so its entry point exists.
    monkeypatch.setenv("OMNI_LOAD_PLUGINS", "")
    nothing = EnginePlugins()
    nothing.load_installed()
    assert nothing.engines() == []
    monkeypatch.setenv("OMNI_LOAD_PLUGINS", "minilm")
    allowed = EnginePlugins()
    allowed.load_installed()
    assert [e.name for e in allowed.engines()] == ["@cf/sentence-transformers/all-minilm-l6-v2"]


class Warmed(Sentiment):
    name = "@cf/acme/warmed"
    warmup: ClassVar[dict[str, Any]] = {"text": "great"}


def test_a_warm_up_request_is_checked_and_described() -> None:
    from omni_sdk.discover import describe

    Warmed.validate_definition()
    assert describe(Warmed)["warmup"] == {"text": "great"}
    assert describe(Sentiment)["warmup"] is None


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ({"txt": "great"}, "`warmup` is not a valid request: input 'text': Field required"),
        ({"text": 3}, "`warmup` is not a valid request: input 'text'"),
        (["great"], "`warmup` must be a dict holding an example request"),
        ({"text": "great", "blob": b"x"}, "`warmup` is not JSON"),
        ({"text": "x" * (2 << 20)}, "over the limit of"),
    ],
)
def test_a_bad_warm_up_is_a_definition_error_naming_the_engine(
    warmup: object, message: str
) -> None:
    engine = type("BadWarmup", (Sentiment,), {"name": "@cf/acme/bad", "warmup": warmup})
    with pytest.raises(EngineDefinitionError, match=message) as error:
        engine.validate_definition()
    assert "BadWarmup" in str(error.value)
