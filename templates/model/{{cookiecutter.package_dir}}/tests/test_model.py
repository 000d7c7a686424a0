"""The engine in-process, through the same codecs omni-runtime serves it with."""

from __future__ import annotations

import pytest

from omni_sdk.testing import EngineCallError, EngineTester
from {{ cookiecutter.module_name }} import {{ cookiecutter.class_name }}
{% if cookiecutter.engine == "python" %}

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
{% else %}
X = [[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]]


def test_answers_through_the_workers_ai_api() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester:
        result = tester.run({"x": X})
{%- if cookiecutter.engine == "onnx" %}
        assert result["y"] == [[2 * v + 1 for v in row] for row in X]
{%- else %}
        from pathlib import Path

        import torch
        from safetensors.torch import load_file

        import {{ cookiecutter.module_name }} as package

        scorer = package.Scorer()
        weights = Path(package.__file__).parent / "weights.safetensors"
        scorer.load_state_dict(load_file(str(weights)))
        expected = scorer(torch.tensor(X)).reshape(-1).tolist()
        got = [v for row in result["y"] for v in row]
        assert got == pytest.approx(expected, abs=1e-5)
{%- endif %}


def test_answers_through_kserve_v2() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester:
        x = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X}
        response = tester.infer_v2({"inputs": [x]})
        [y] = response["outputs"]
        assert y["name"] == "y" and y["shape"][0] == 2


def test_bad_input_names_the_tensor() -> None:
    with EngineTester({{ cookiecutter.class_name }}) as tester, pytest.raises(EngineCallError) as info:
        tester.run({"x": [[1.0, 2.0]]})
    assert info.value.status == 400
    assert "'x'" in str(info.value)
{% endif %}
