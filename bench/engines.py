"""Embeddings per second: the TorchEngine and OnnxEngine MiniLM examples served by Omni,
against the same library called directly in one process.

    python bench/engines.py [--seconds 3]

Rows, per example and batch size (texts per request, 1, 8 and 32):
  direct   one process: tokenise, run the model (torch module / onnxruntime session),
           pool: what the example's engine does, with no serving around it
  omni     omni-runtime serving the example; one client sends /ai/run requests back to back
  ratio    omni / direct
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXAMPLES = {
    "torch": (
        REPO / "examples" / "embeddings-minilm-torch",
        "omni_example_minilm_torch",
        "MiniLMTorch",
    ),
    "onnx": (
        REPO / "examples" / "embeddings-minilm-onnx",
        "omni_example_minilm_onnx",
        "MiniLMOnnx",
    ),
}
SIZES = (1, 8, 32)
SENTENCE = "Omni serves many AI models on few GPUs, each in its own isolated process."


def texts(n: int) -> list[str]:
    return [f"{SENTENCE} ({i})" for i in range(n)]


def rate(call: Callable[[], None], per_call: int, seconds: float) -> float:
    call()  # warm up
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        count += 1
    return count * per_call / (time.perf_counter() - start)


def direct(kind: str, seconds: float) -> dict[int, float]:
    """The engine's own model code, in this process, with no runtime around it."""
    import importlib

    from omni_sdk import LoadContext

    path, module_name, class_name = EXAMPLES[kind]
    sys.path.insert(0, str(path))
    engine_class = getattr(importlib.import_module(module_name), class_name)
    engine = engine_class()
    engine.load(LoadContext(model_name=engine_class.name, logger=logging.getLogger("bench")))
    tokenizer = engine.tokenizer
    results = {}
    for size in SIZES:
        batch = texts(size)
        if kind == "torch":
            import torch

            def call(batch: list[str] = batch) -> None:
                arrays = tokenizer.encode(batch)
                with torch.inference_mode():
                    engine.module(*(torch.from_numpy(arrays[n]) for n in engine.input_names))

        else:

            def call(batch: list[str] = batch) -> None:
                engine.session.run(None, tokenizer.encode(batch))

        results[size] = rate(call, size, seconds)
    return results


def served(seconds: float) -> dict[str, dict[int, float]]:
    from tests.e2e.runtime import serve

    results: dict[str, dict[int, float]] = {}
    with (
        serve(*(path for path, _, _ in EXAMPLES.values())) as runtime,
        httpx.Client(base_url=runtime.url, timeout=120) as client,
    ):
        for kind in EXAMPLES:
            model = f"@cf/sentence-transformers/all-minilm-l6-v2-{kind}"
            results[kind] = {}
            for size in SIZES:
                body = {"text": texts(size)}

                def call(body: dict[str, list[str]] = body, model: str = model) -> None:
                    response = client.post(f"/ai/run/{model}", json=body)
                    response.raise_for_status()

                results[kind][size] = rate(call, size, seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    through_omni = served(args.seconds)
    print(f"{'example':8} {'batch':>5} {'direct/s':>10} {'omni/s':>10} {'ratio':>6}")
    for kind in EXAMPLES:
        alone = direct(kind, args.seconds)
        for size in SIZES:
            omni = through_omni[kind][size]
            print(f"{kind:8} {size:5d} {alone[size]:10.1f} {omni:10.1f} {omni / alone[size]:6.2f}")


if __name__ == "__main__":
    main()
