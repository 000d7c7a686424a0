"""Test an engine in-process, through the same codecs the runtime serves it with.

from omni_sdk.testing import EngineTester

def test_sentiment():
    with EngineTester(Sentiment) as tester:
        assert tester.run({"text": "great"})["label"] == "positive"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omni_sdk._engine import Engine, LoadContext
from omni_sdk._runners import runner_for
from omni_sdk.sequences import SequenceControls

__all__ = ["EngineCallError", "EngineTester"]


class EngineCallError(Exception):
    """The engine answered with an error; ``status`` is the HTTP status the runtime would send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EngineTester:
    """Loads one engine in this process and calls it as the runtime would."""

    def __init__(
        self,
        engine: type[Engine],
        *,
        device: str = "cpu",
        model_dir: Path | None = None,
        sequence: SequenceControls | None = None,
    ) -> None:
        """``sequence``: the control inputs ``[models."NAME".sequence]`` would give it, filled
        from each v2 request's ``sequence_id``, ``sequence_start`` and ``sequence_end``."""
        engine.validate_definition()
        self.engine = engine()
        ctx = LoadContext(
            model_name=engine.name,
            device=device,
            model_dir=model_dir or Path.cwd(),
            resources=engine.resources,
            logger=logging.getLogger(f"omni.model.{engine.name}"),
        )
        self.engine.load(ctx)
        self.runner = runner_for(self.engine)
        if sequence is not None:
            self.runner.use_sequences(sequence)

    def __enter__(self) -> EngineTester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.unload()

    def run_raw(self, body: bytes) -> tuple[int, bytes]:
        """``POST /ai/run/{model}`` with a raw body: ``(status, response body)``."""
        prepared = self.runner.prepare_json(body)
        outcomes = self._call([prepared])
        status, _, parts = self.runner.respond(prepared, outcomes[0] if outcomes else None)
        return status, b"".join(parts)

    def run(self, body: dict[str, Any]) -> Any:
        """``POST /ai/run/{model}``: the ``result`` on success, else ``EngineCallError``."""
        status, raw = self.run_raw(json.dumps(body).encode())
        envelope = json.loads(raw)
        if not envelope["success"]:
            raise EngineCallError(status, envelope["errors"][0]["message"])
        return envelope["result"]

    def infer_v2(self, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /v2/models/{model}/infer`` with a JSON body; returns the response JSON."""
        prepared = self.runner.prepare_v2(json.dumps(request).encode(), 0)
        outcomes = self._call([prepared])
        status, header_length, parts = self.runner.respond(
            prepared, outcomes[0] if outcomes else None
        )
        body = b"".join(parts)
        if status != 200:
            raise EngineCallError(status, json.loads(body)["error"])
        if header_length:
            raise EngineCallError(500, "binary outputs: ask for JSON outputs in infer_v2")
        result: dict[str, Any] = json.loads(body)
        return result

    def infer_v2_raw(self, body: bytes, header_length: int = 0) -> tuple[int, int, bytes]:
        """``POST /v2/models/{model}/infer`` with a raw body (binary tensors allowed):
        ``(status, Inference-Header-Content-Length, response body)``."""
        prepared = self.runner.prepare_v2(body, header_length)
        outcomes = self._call([prepared])
        status, length, parts = self.runner.respond(prepared, outcomes[0] if outcomes else None)
        return status, length, b"".join(parts)

    def infer_arrays(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Numpy arrays in, numpy arrays out, through the binary v2 encoding a client uses."""
        from omni_sdk._tensor_serving import v2_binary_request, v2_binary_response

        body, header_length = v2_binary_request(inputs)
        status, length, raw = self.infer_v2_raw(body, header_length)
        if status != 200:
            raise EngineCallError(status, json.loads(raw)["error"])
        return v2_binary_response(raw, length)

    def _call(self, prepared: list[Any]) -> list[Any]:
        if self.runner.is_async:
            import asyncio

            return asyncio.run(self.runner.arun(prepared))
        return self.runner.run(prepared)
