"""OpenAI-compatible routes under ``/v1``, as the official ``openai`` client calls them.

- ``GET /v1/models``: every served model;
- ``POST /v1/embeddings``: ``text-embeddings`` engines (input ``text``, output ``data``, as
  Workers AI's embedding models have), floats or base64;
- ``POST /v1/chat/completions`` and ``POST /v1/completions``: ``text-generation`` engines whose
  input has ``messages`` (chat) or ``prompt`` and whose output has ``response``, streamed or not.

The body's ``model`` picks the engine. Each request becomes the engine's own ``/ai/run`` input
and goes through the model's queue like any other; errors use OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

from omni_runtime.scheduler import ModelBusy, ModelDirectory, ModelHandle, ModelUnavailable
from omni_runtime.server import sse
from omni_runtime.server.http import (
    HTTPError,
    Receive,
    Scope,
    Send,
    openai_error,
    read_body,
    respond,
    respond_json,
)
from omni_sdk.wire import Kind

__all__ = ["OpenAIError", "OpenAIRoutes"]

# Request fields passed on to the engine when its input has them (Workers AI's names).
_GENERATION_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "stop",
)


class OpenAIError(HTTPError):
    """An error answered in OpenAI's shape (every error on a ``/v1`` route is)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = ""):
        super().__init__(status, message, param=param, code=code or None)


class OpenAIRoutes:
    """The ``/v1`` handlers; each takes ``(scope, receive, send, None)``: the body names the
    model."""

    def __init__(self, models: ModelDirectory) -> None:
        self.models = models
        self.max_body = models.settings.max_body_size
        self.created = int(time.time())

    # -- routes --------------------------------------------------------------------------

    async def list_models(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        data = [
            {
                "id": model.name,
                "object": "model",
                "created": self.created,
                "owned_by": "omni",
                "task": model.spec.task,
            }
            for model in self.models
        ]
        await respond_json(send, {"object": "list", "data": data})

    async def embeddings(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        request, model = await self._request(scope, receive, "text-embeddings")
        texts = request.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise OpenAIError(
                400, "'input' must be a string or a non-empty list of strings", param="input"
            )
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise OpenAIError(
                400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        result = await self._run(model, self._input(model, {"text": texts}))
        vectors = result.get("data") if isinstance(result, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise OpenAIError(
                500,
                f"model '{model.name}' did not answer a 'data' list of {len(texts)} vectors",
            )
        data = []
        for index, vector in enumerate(vectors):
            embedding: Any = vector
            if encoding == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        answer = {
            "object": "list",
            "data": data,
            "model": model.name,
            "usage": _usage(result, prompt=sum(len(t.split()) for t in texts)),
        }
        await respond_json(send, answer)

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        request, model = await self._request(scope, receive, "text-generation")
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
        if "messages" not in model.spec.input_schema.get("properties", {}):
            raise OpenAIError(
                400,
                f"model '{model.name}' takes no 'messages' (it is not a chat model); "
                "use /v1/completions",
                param="model",
            )
        values = {"messages": [_message(m) for m in messages]}
        await self._generate(scope, receive, send, model, request, values, chat=True)

    async def completions(self, scope: Scope, receive: Receive, send: Send, _: None) -> None:
        request, model = await self._request(scope, receive, "text-generation")
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "'prompt' must be a string", param="prompt")
        if "prompt" not in model.spec.input_schema.get("properties", {}):
            raise OpenAIError(
                400, f"model '{model.name}' takes no 'prompt'; use /v1/chat/completions"
            )
        await self._generate(scope, receive, send, model, request, {"prompt": prompt}, chat=False)

    # -- generation ----------------------------------------------------------------------

    async def _generate(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        model: ModelHandle,
        request: dict[str, Any],
        values: dict[str, Any],
        chat: bool,
    ) -> None:
        for field in _GENERATION_FIELDS:
            if request.get(field) is not None:
                values[field] = request[field]
        completion_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        stream = request.get("stream") is True
        if not stream:
            result = await self._run(model, self._input(model, values))
            text = _response_text(model, result)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            answer = {
                "id": completion_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model.name,
                "choices": [choice],
                "usage": _usage(result),
            }
            await respond_json(send, answer)
            return
        values["stream"] = True
        body = json.dumps(self._input(model, values)).encode()
        object_name = "chat.completion.chunk" if chat else "text_completion"

        def event(text: str | None, finish: str | None, first: bool = False) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            chunk = {
                "id": completion_id,
                "object": object_name,
                "created": created,
                "model": model.name,
                "choices": [choice],
            }
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        await self._stream(receive, send, model, body, event)

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        model: ModelHandle,
        body: bytes,
        event: Callable[..., bytes],
    ) -> None:
        stream = sse.StreamedCall(model, body, receive)
        opened = False
        try:
            async for raw in stream:
                try:
                    text = _response_text(model, json.loads(raw))
                except (OpenAIError, ValueError) as exc:
                    if not opened:
                        raise OpenAIError(500, str(exc)) from None
                    error = b"data: " + openai_error(500, str(exc)) + b"\n\n"
                    await send({"type": "http.response.body", "body": error})
                    return
                if not opened:
                    await send(sse.START)
                await send(sse.event(event(text, None, first=not opened)))
                opened = True
            if stream.client_gone:
                return
            try:
                status, _, final = stream.result()
            except ModelBusy as exc:
                status, final = 429, openai_error(429, str(exc))
            except ModelUnavailable as exc:
                status, final = 503, openai_error(503, str(exc))
            if status != 200:
                message = _message_of(final)
                if not opened:
                    await respond(send, status, openai_error(status, message))
                    return
                error = b"data: " + openai_error(status, message) + b"\n\n"
                await send({"type": "http.response.body", "body": error})
                return
            if not opened:
                await send(sse.START)
                await send(sse.event(event("", None, first=True)))
            closing = event(None, "stop") + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": closing})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            stream.close()  # whatever ended this, the engine's generator stops too

    # -- helpers -------------------------------------------------------------------------

    async def _request(
        self, scope: Scope, receive: Receive, task: str
    ) -> tuple[dict[str, Any], ModelHandle]:
        body = await read_body(scope, receive, self.max_body)
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise OpenAIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        name = request.get("model")
        if not isinstance(name, str):
            raise OpenAIError(400, "'model' is required: the name of a served model", "model")
        model = self.models.get(name)
        if model is None:
            known = ", ".join(self.models.names()) or "none"
            raise OpenAIError(
                404,
                f"The model '{name}' does not exist (served models: {known})",
                param="model",
                code="model_not_found",
            )
        if model.spec.task != task:
            raise OpenAIError(
                400,
                f"model '{name}' is a {model.spec.task} model; this route serves {task} models",
                param="model",
            )
        return request, model

    def _input(self, model: ModelHandle, values: dict[str, Any]) -> dict[str, Any]:
        """The engine's own input: only the fields its schema has."""
        fields = model.spec.input_schema.get("properties", {})
        return {k: v for k, v in values.items() if k in fields}

    async def _run(self, model: ModelHandle, values: dict[str, Any]) -> Any:
        try:
            status, _, body = await model.call(Kind.RUN_JSON, [json.dumps(values).encode()])
        except ModelBusy as exc:
            raise OpenAIError(429, str(exc)) from None
        except ModelUnavailable as exc:
            raise OpenAIError(503, str(exc)) from None
        if status != 200:
            raise OpenAIError(status, _message_of(body))
        return json.loads(body)["result"]


def _message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict) or "role" not in message:
        raise OpenAIError(400, "each message needs a 'role' and 'content'", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: the text ones, joined
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return {"role": message["role"], "content": content if isinstance(content, str) else ""}


def _response_text(model: ModelHandle, result: Any) -> str:
    if not isinstance(result, dict) or not isinstance(result.get("response"), str):
        raise OpenAIError(500, f"model '{model.name}' did not answer a 'response' string")
    text: str = result["response"]
    return text


def _message_of(body: bytes) -> str:
    """The message of a Workers AI or v2 error body."""
    try:
        decoded = json.loads(body)
        if isinstance(decoded.get("errors"), list) and decoded["errors"]:
            return str(decoded["errors"][0].get("message"))
        return str(decoded.get("error"))
    except (ValueError, AttributeError, TypeError):
        return body.decode(errors="replace")


def _usage(result: Any, prompt: int = 0) -> dict[str, int]:
    usage = result.get("usage") if isinstance(result, dict) else None
    if isinstance(usage, dict):
        p = int(usage.get("prompt_tokens", 0) or 0)
        c = int(usage.get("completion_tokens", 0) or 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
