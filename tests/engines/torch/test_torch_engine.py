"""TorchEngine: torch.export programs, TorchScript files, and module factory + safetensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_engine_torch import TorchEngine
from omni_sdk import ModelLoadError, Tensor
from omni_sdk.testing import EngineCallError, EngineTester


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.sum(dim=1)


def _module() -> Affine:
    torch.manual_seed(0)
    return Affine().eval()


def _engine(**attrs: object) -> type[TorchEngine]:
    base = {
        "name": "@test/affine",
        "inputs": (Tensor("x", "FP32", (-1, 3)),),
        "outputs": (Tensor("y", "FP32", (-1, 2)), Tensor("total", "FP32", (-1,))),
        "max_batch_size": 8,
    }
    return type("AffineEngine", (TorchEngine,), base | attrs)


def _expected(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _module()(torch.from_numpy(x))[0].numpy()


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def test_torch_export_program(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(_module(), (torch.ones(2, 3),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "affine.pt2")
    with EngineTester(_engine(model_file=str(tmp_path / "affine.pt2"))) as tester:
        out = tester.infer_arrays({"x": X})
        np.testing.assert_allclose(out["y"], _expected(X), rtol=1e-5)
        np.testing.assert_allclose(out["total"], _expected(X).sum(axis=1), rtol=1e-5)
        assert tester.run({"x": [[1.0, 2.0, 3.0]]})["y"][0] == pytest.approx(
            _expected(np.array([[1, 2, 3]], dtype=np.float32))[0].tolist(), rel=1e-5
        )


def test_torchscript_file(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(_module(), torch.ones(1, 3)), tmp_path / "affine.pt")
    with EngineTester(_engine(model_file=str(tmp_path / "affine.pt"))) as tester:
        np.testing.assert_allclose(tester.infer_arrays({"x": X})["y"], _expected(X), rtol=1e-5)


def test_module_factory_with_safetensors(tmp_path: Path) -> None:
    save_file(_module().state_dict(), tmp_path / "affine.safetensors")

    class Factory(_engine(weights_file=str(tmp_path / "affine.safetensors"))):  # type: ignore[misc]
        def build_module(self) -> torch.nn.Module:
            return Affine()  # random weights until the file's load

    with EngineTester(Factory) as tester:
        np.testing.assert_allclose(tester.infer_arrays({"x": X})["y"], _expected(X), rtol=1e-5)
        assert torch.get_num_threads() == 1  # Resources(cpus=1.0) by default


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_safetensors_weights_stay_mapped_from_the_file(tmp_path: Path) -> None:
    """The module keeps the tensors safetensors mapped (no copy: replicas share the pages),
    and build_module's random initialisation is skipped (the file overwrites it anyway)."""
    weights = tmp_path / "affine.safetensors"
    save_file(_module().state_dict(), weights)
    filled: list[str] = []

    class Factory(_engine(weights_file=str(weights))):  # type: ignore[misc]
        def build_module(self) -> torch.nn.Module:
            module = Affine()
            probe = torch.zeros(4)
            probe.normal_()  # what an initialiser does: skipped while the module is built
            filled.append("ran" if probe.abs().sum() > 0 else "skipped")
            return module

    with EngineTester(Factory) as tester:
        module = tester.engine.module
        ranges = _mapped_from(weights)
        assert ranges, "the weights file is not mapped"
        for name, parameter in module.named_parameters():
            address = parameter.data_ptr()
            assert any(start <= address < end for start, end in ranges), name
        np.testing.assert_allclose(tester.infer_arrays({"x": X})["y"], _expected(X), rtol=1e-5)
    assert filled == ["skipped"]
    probe = torch.zeros(64)
    probe.normal_()  # and random fills work again afterwards
    assert probe.abs().sum() > 0


def test_wrong_shape_or_datatype_names_the_tensor(tmp_path: Path) -> None:
    save_file(_module().state_dict(), tmp_path / "affine.safetensors")

    class Factory(_engine(weights_file=str(tmp_path / "affine.safetensors"))):  # type: ignore[misc]
        def build_module(self) -> torch.nn.Module:
            return Affine()

    with EngineTester(Factory) as tester:
        with pytest.raises(EngineCallError, match=r"input 'x' has shape \[2, 4\], expected"):
            tester.infer_arrays({"x": np.ones((2, 4), dtype=np.float32)})
        with pytest.raises(EngineCallError, match="input 'x' has datatype FP64, expected FP32"):
            tester.infer_arrays({"x": np.ones((2, 3))})


def test_missing_and_corrupt_files_name_the_model_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt2"
    with pytest.raises(ModelLoadError, match=f"model '@test/affine': model file {missing}"):
        EngineTester(_engine(model_file=str(missing)))
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match=f"cannot read {corrupt} as a torch.export program"):
        EngineTester(_engine(model_file=str(corrupt)))
    script = tmp_path / "corrupt.pt"
    script.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=f"cannot read {script} as a TorchScript module"):
        EngineTester(_engine(model_file=str(script)))


def test_weights_that_do_not_fit_the_module(tmp_path: Path) -> None:
    save_file({"other.weight": torch.ones(2)}, tmp_path / "w.safetensors")

    class Factory(_engine(weights_file=str(tmp_path / "w.safetensors"))):  # type: ignore[misc]
        def build_module(self) -> torch.nn.Module:
            return Affine()

    with pytest.raises(ModelLoadError, match="does not fit build_module"):
        EngineTester(Factory)
