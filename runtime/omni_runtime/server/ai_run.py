"""Workers AI's ``/ai/run/{model}``: a JSON input, answered whole, streamed as server-sent
events (``"stream": true``), or queued as an asynchronous batch (``?queueRequest=true``);
and ``GET /ai/batch``, the batches of this node (of the fleet, in a fleet).

The body goes to the worker as it came. Only while a model has no replica ready is it checked
here first (``input_check.py``), so that a body the model would refuse does not start it.
"""

from __future__ import annotations

import json
import time
import weakref

from omni_runtime.batch import api as batch_api
from omni_runtime.batch.runner import BatchRunner
from omni_runtime.batch.store import BatchStoreUnavailable
from omni_runtime.scheduler import ModelBusy, ModelDirectory, ModelHandle, ModelUnavailable
from omni_runtime.scheduler.trace import version_header
from omni_runtime.server import sse
from omni_runtime.server.http import (
    HTTPError,
    Receive,
    Scope,
    Send,
    accepted_encoding,
    error_body,
    read_body,
    respond,
)
from omni_runtime.server.input_check import InputCheck
from omni_runtime.server.kserve import model_reply, names_version
from omni_sdk.wire import Kind

__all__ = ["AiRunRoutes"]


class AiRunRoutes:
    def __init__(self, models: ModelDirectory, batches: BatchRunner | None) -> None:
        self.models = models
        self.batches = batches
        self.batch_limit = models.settings.batch_max_size
        self.max_body = models.settings.max_body_size
        # Made on a model's first request while it has no replica ready.
        self._input_checks: weakref.WeakKeyDictionary[ModelHandle, InputCheck | None] = (
            weakref.WeakKeyDictionary()
        )

    @names_version
    async def run(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        started = time.perf_counter()
        try:
            body = await read_body(scope, receive, self.max_body, model.name)
        except HTTPError as exc:
            model.account(exc.status, started)  # (a body too large counts as an answer)
            raise
        if (
            self.batches is not None
            and (scope["query_string"] or b"request_id" in body)  # (the cheap test first)
            and await self._batch(scope, send, model, body)
        ):
            return
        if not model.ready_replicas and (problem := self._refused_before_start(model, body)):
            # Nothing would run it anyway: say so now rather than after a cold start.
            model.account(400, started)
            await respond(send, 400, error_body(True, 400, problem), extra=_version(model))
            return
        reject = b"rejectIfBusy" in body and _reject_if_busy(body)
        if b'"stream"' in body and _wants_stream(body):
            await self._stream(receive, send, model, body, started, reject)
            return
        encoding = accepted_encoding(scope["headers"])
        reply = await model_reply(model, Kind.RUN_JSON, [body], started, True, reject, encoding)
        await respond(send, *reply)

    async def _batch(self, scope: Scope, send: Send, model: ModelHandle, body: bytes) -> bool:
        """A batch submitted or polled: answered here (True), else an ordinary request."""
        assert self.batches is not None
        answer = None
        try:
            if scope["query_string"] and batch_api.is_submission(scope["query_string"]):
                answer = await batch_api.submit(self.batches, model, body, self.batch_limit)
            elif (request_id := batch_api.is_poll(body)) is not None:
                answer = await batch_api.poll(self.batches, model, request_id)
        except BatchStoreUnavailable as exc:
            answer = 503, {"error": f"model '{model.name}': {exc}; try again shortly"}
        if answer is None:
            return False
        status, content = answer
        if status == 200:
            payload = {**content, "success": True, "errors": [], "messages": []}
            await respond(send, 200, json.dumps(payload).encode(), extra=_version(model))
        else:
            body = error_body(True, status, content["error"])
            await respond(send, status, body, extra=_version(model))
        return True

    def _refused_before_start(self, model: ModelHandle, body: bytes) -> str:
        """Why a model with no replica ready would refuse ``body`` (not a JSON object, or not
        what its input schema allows), or "" when only the worker can tell."""
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _not_an_input(model, f"not valid JSON ({exc})")
        except RecursionError:
            return _not_an_input(model, "JSON nested too deeply")
        if not isinstance(value, dict):
            kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
            return _not_an_input(model, f"JSON {kinds.get(type(value), 'a number')}, not an object")
        if model not in self._input_checks:
            spec = model.spec
            self._input_checks[model] = (
                InputCheck(model.name, spec.input_schema) if spec.input_schema_exact else None
            )
        check = self._input_checks[model]
        return check.problem(value) if check is not None else ""

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        model: ModelHandle,
        body: bytes,
        started: float,
        reject_if_busy: bool,
    ) -> None:
        """``"stream": true``: server-sent events, one ``data: {chunk}`` per chunk as the
        engine yields it, then ``data: [DONE]``. Until the first chunk nothing is sent, so an
        error before it (bad input, a full queue) is an ordinary JSON error response; one after
        it is an ``event: error`` in the stream. A client that goes away cancels the engine's
        generator."""
        stream = sse.StreamedCall(model, body, receive, reject_if_busy, started)
        start = {**sse.START, "headers": [*sse.START["headers"], *_version(model)]}
        opened = False
        try:
            async for chunk in stream:
                if not opened:
                    opened = True
                    await send(start)
                await send(sse.event(b"data: " + chunk + b"\n\n"))
            if stream.client_gone:
                return
            try:
                status, _, final = stream.result()
            except ModelBusy as exc:
                status, final = 429, error_body(True, 429, str(exc))
            except ModelUnavailable as exc:
                status, final = 503, error_body(True, 503, str(exc))
            if not opened and status != 200:
                await respond(send, status, final, extra=_version(model))
                return
            if not opened:
                await send(start)
            if status == 200:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            else:
                error = b"event: error\ndata: " + final + b"\n\n"
                await send({"type": "http.response.body", "body": error})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            stream.close()  # whatever ended this, the engine's generator stops too

    async def batch_index(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        """``GET /ai/batch``: the asynchronous batches (the admin token guards it)."""
        if self.batches is None:
            raise HTTPError(404, "this runtime keeps no batch queue")
        try:
            batches = await batch_api.batch_index(self.batches)
        except BatchStoreUnavailable as exc:
            raise HTTPError(503, f"{exc}; try again shortly") from None
        payload = {"result": batches, "success": True, "errors": [], "messages": []}
        await respond(send, 200, json.dumps(payload).encode())


def _version(model: ModelHandle) -> list[tuple[bytes, bytes]]:
    """The answer's ``Omni-Model-Version``, unless the HTTP app adds it (see names_version)."""
    return version_header(model.version_header)


def _not_an_input(model: ModelHandle, problem: str) -> str:
    return f"model '{model.name}': the body is {problem}; send the model's input"


def _wants_stream(body: bytes) -> bool:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False  # the worker reports the malformed body
    return isinstance(request, dict) and request.get("stream") is True


def _reject_if_busy(body: bytes) -> bool:
    try:
        options = json.loads(body).get("options")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
        return False  # the worker reports the malformed body
    return isinstance(options, dict) and options.get("rejectIfBusy") is True
