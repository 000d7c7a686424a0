"""The engine in-process, through the same codecs omni-runtime serves it with."""

from __future__ import annotations

import pytest

from omni_sdk.testing import EngineCallError, EngineTester
from {{ cookiecutter.module_name }} import {{ cookiecutter.class_name }}


def test_answers_through_the_workers_ai_api() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester:
        result = tester.run({"text": "a great day"})
        assert result["label"] == "positive"


def test_answers_through_kserve_v2() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester:
        response = tester.infer_v2(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["meh"]}]}
        )
        outputs = {o["name"]: o["data"] for o in response["outputs"]}
        assert outputs["label"] == ["negative"]


def test_bad_input_names_the_field() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester, pytest.raises(EngineCallError) as info:
        tester.run({"text": ""})
    assert info.value.status == 400
    assert "input 'text'" in str(info.value)
