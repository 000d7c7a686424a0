"""OnnxEngine: tensors read from the graph, CPU fallback, batching, bad graphs and inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from omni_engine_onnx import OnnxEngine, cuda_usable
from omni_sdk import ModelLoadError
from omni_sdk.discover import describe
from omni_sdk.testing import EngineCallError, EngineTester


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 reads up to 13
    onnx.save(model, path)
    return path


def _scale_graph(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2])
    node = helper.make_node("Mul", ["x", "two"], ["y"])
    return _save(helper.make_graph([node], "scale", [x], [y], [two]), path)


def _engine(path: Path, **attrs: object) -> type[OnnxEngine]:
    base = {"name": "@test/scale", "model_file": str(path), "max_batch_size": 4}
    return type("Scale", (OnnxEngine,), base | attrs)


def test_inputs_and_outputs_come_from_the_graph(tmp_path: Path) -> None:
    engine = _engine(_scale_graph(tmp_path / "scale.onnx"))
    described = describe(engine)
    assert described["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3], "optional": False}
    ]
    assert described["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with EngineTester(engine) as tester:
        np.testing.assert_array_equal(tester.infer_arrays({"x": x})["y"], x * 2)
        assert tester.run({"x": [[1, 2, 3]]}) == {"y": [[2.0, 4.0, 6.0]]}


def test_cuda_is_used_only_when_really_usable(tmp_path: Path) -> None:
    engine = _engine(_scale_graph(tmp_path / "scale.onnx"))
    with EngineTester(engine, device="cuda") as tester:
        providers = tester.engine.session.get_providers()  # type: ignore[attr-defined]
        if not cuda_usable():
            assert providers == ["CPUExecutionProvider"]
        else:
            assert providers[0] == "CUDAExecutionProvider"
        assert tester.engine.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]


def test_wrong_datatype_and_shape_are_400s(tmp_path: Path) -> None:
    with EngineTester(_engine(_scale_graph(tmp_path / "scale.onnx"))) as tester:
        with pytest.raises(EngineCallError, match="input 'x' has datatype INT64, expected FP32"):
            tester.infer_arrays({"x": np.ones((1, 3), dtype=np.int64)})
        with pytest.raises(EngineCallError, match=r"input 'x' has shape \[1, 4\]"):
            tester.infer_arrays({"x": np.ones((1, 4), dtype=np.float32)})


def test_unsupported_element_type_names_the_tensor(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
    path = _save(helper.make_graph([node], "bf16", [x], [y]), tmp_path / "bf16.onnx")
    with pytest.raises(ModelLoadError) as caught:
        describe(_engine(path))
    message = str(caught.value)
    assert "model '@test/scale'" in message
    assert "input 'x' has type tensor(bfloat16)" in message


def test_missing_and_corrupt_graphs_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ModelLoadError, match=f"model '@test/scale': model file {missing}"):
        EngineTester(_engine(missing, inputs=(), outputs=()))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelLoadError, match=f"onnxruntime cannot load {corrupt}"):
        describe(_engine(corrupt))


def test_cuda_provider_options_hand_onnxruntime_the_cstub_allocator() -> None:
    import logging

    import omni_cstub
    from omni_engine_onnx import OnnxEngine
    from omni_sdk import LoadContext

    class Probe(OnnxEngine):
        name = "probe"
        model_file = "unused.onnx"

    options = Probe().cuda_provider_options(
        LoadContext(model_name="probe", device="cuda:1", logger=logging.getLogger("test"))
    )
    assert options["device_id"] == "1"
    addresses = omni_cstub.Hooks().ort_allocator_addresses()
    for name in ("gpu_external_alloc", "gpu_external_free", "gpu_external_empty_cache"):
        assert options[name] == str(addresses[name]) != "0"


def _matmul_graph(path: Path) -> Path:
    """x [batch, 64] @ w [64, 64], w kept as external data beside the graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    w = onnx.numpy_helper.from_array(np.eye(64, dtype=np.float32) * 3, name="w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "matmul", [x], [y], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 10
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=path.name + ".data",
        size_threshold=1024,
    )  # fmt: skip
    return path


def test_weights_in_external_data_stay_mapped_and_are_opened_once(tmp_path: Path) -> None:
    """Replicas share the weights: onnxruntime maps the external data and, with prepacking
    off, keeps using those pages; the session that described the graph is the one loaded."""
    import omni_engine_onnx._engine as onnx_engine

    graph = _matmul_graph(tmp_path / "matmul.onnx")
    engine = _engine(graph, name="@test/matmul")
    engine.validate_definition()
    opened = onnx_engine._OPENED.get(onnx_engine._file_key(engine, graph))
    assert opened is not None  # described by opening it: kept for the load
    x = np.ones((2, 64), dtype=np.float32)
    with EngineTester(engine) as tester:
        assert tester.engine.session is opened  # not opened a second time
        np.testing.assert_array_equal(tester.infer_arrays({"x": x})["y"], x * 3)
        options = tester.engine.session.get_session_options()
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        maps = Path("/proc/self/maps").read_text()
        assert str(graph) + ".data" in maps
    assert not onnx_engine._OPENED  # nothing held after the load

    repacked = _engine(graph, name="@test/matmul-repacked", prepack_weights=True)
    with EngineTester(repacked) as tester:
        options = tester.engine.session.get_session_options()
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.disable_prepacking")
