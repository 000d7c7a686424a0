"""What the model needs before it can load, built by its own tests."""

from __future__ import annotations

from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "{{ cookiecutter.module_name }}"
{% if cookiecutter.engine == "torch" %}

@pytest.fixture(scope="session", autouse=True)
def weights() -> Path:
    """Deterministic weights for Scorer, written once beside the module."""
    import torch
    from safetensors.torch import save_file

    from {{ cookiecutter.module_name }} import Scorer

    path = MODULE_DIR / "weights.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file(Scorer().state_dict(), str(path))
        path.chmod(0o644)  # the model runs as a user of its own: it must be able to read it
    return path
{% elif cookiecutter.engine == "onnx" %}

@pytest.fixture(scope="session", autouse=True)
def graph() -> Path:
    """y = 2x + 1 for x of shape [batch, 4], written once beside the module."""
    import onnx
    from onnx import TensorProto, helper

    path = MODULE_DIR / "model.onnx"
    if not path.exists():
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
        two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
        one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        nodes = [
            helper.make_node("Mul", ["x", "two"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "affine", [x], [y], initializer=[two, one])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(path))
        path.chmod(0o644)  # the model runs as a user of its own: it must be able to read it
    return path
{% endif %}
