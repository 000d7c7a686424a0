"""Leave the package ready to serve: what the chosen engine kind needs, and nothing else.

A zero-code package has no Python at all. The onnx variants keep the template's graph,
y = 2x + 1 for x of shape [batch, 4]. The torch variant gets weights for its module (a
Linear(4, 1) with every weight 0.25 and bias 1: y = mean(x) + 1), written here in the
safetensors format by plain Python: this hook runs in omni-runtime's interpreter, which
need not have torch.
"""

import json
import shutil
import struct
from pathlib import Path

ENGINE = "{{ cookiecutter.engine }}"
MODULE = Path("{{ cookiecutter.module_name }}")


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], list[float]]]) -> None:
    """float32 tensors by name (shape, values in row-major order), as safetensors lays them out:
    an 8-byte little-endian header length, a JSON header, then the raw data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
        data += raw
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


if ENGINE == "zero-code":
    Path("pyproject.toml").unlink()
    shutil.rmtree("tests")
    (MODULE / "model.onnx").rename("model.onnx")
    shutil.rmtree(MODULE)
elif ENGINE != "onnx":
    (MODULE / "model.onnx").unlink()
if ENGINE == "torch":
    weights = MODULE / "weights.safetensors"
    write_safetensors(weights, {"linear.weight": ([1, 4], [0.25] * 4), "linear.bias": ([1], [1.0])})
# The model runs as a user of its own (Omni's docs/isolation.md): it must be able to read its
# package whatever the umask it was written with.
for path in [Path("."), *Path(".").rglob("*")]:
    path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
