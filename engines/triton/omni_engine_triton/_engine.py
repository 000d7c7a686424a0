"""``TritonEngine``: a model served by another Triton / KServe v2 server, joined to Omni."""

from __future__ import annotations

from typing import Any, ClassVar

from numpy.typing import NDArray

from omni_sdk import InvalidInput, LoadContext, ModelLoadError, Tensor, TensorEngine

__all__ = ["TritonEngine"]


class TritonEngine(TensorEngine):
    """Forward requests to a model on an existing Triton (or any KServe v2) server.

    A subclass sets ``url`` (``http://host:port``; ``https://`` works too) and
    ``remote_model`` (the model's name there; ``remote_version`` optionally). The remote
    model's metadata gives the inputs and outputs, which become this model's v2 metadata;
    declare ``inputs``/``outputs`` to serve it without asking the server at discovery (or to
    add ``pad`` values for batching). ``timeout`` bounds each call to the server, in seconds.
    """

    url: ClassVar[str] = ""
    remote_model: ClassVar[str] = ""
    remote_version: ClassVar[str] = ""
    timeout: ClassVar[float] = 60.0

    @classmethod
    def _client(cls, timeout: float) -> Any:
        import tritonclient.http as http

        if not cls.url or not cls.remote_model:
            raise ModelLoadError(f"model '{cls.name}': set url (http://host:port) and remote_model")
        scheme, _, rest = cls.url.rpartition("://")
        location = (rest or cls.url).rstrip("/")
        return http.InferenceServerClient(
            location,
            ssl=scheme == "https",
            connection_timeout=timeout,
            network_timeout=timeout,
        )

    @classmethod
    def _remote_tensors(cls, client: Any) -> tuple[list[Tensor], list[Tensor]]:
        try:
            metadata = client.get_model_metadata(cls.remote_model, cls.remote_version)
        except Exception as exc:
            raise ModelLoadError(cls._unreachable(exc)) from exc

        def convert(entry: dict[str, Any]) -> Tensor:
            try:
                return Tensor(entry["name"], entry["datatype"], tuple(entry["shape"]))
            except Exception as exc:
                raise ModelLoadError(
                    f"model '{cls.name}': {cls.url} describes tensor {entry!r} in a way "
                    f"Omni cannot serve: {exc}"
                ) from exc

        inputs = [convert(e) for e in metadata.get("inputs", [])]
        outputs = [convert(e) for e in metadata.get("outputs", [])]
        return inputs, outputs

    @classmethod
    def _unreachable(cls, exc: BaseException) -> str:
        detail = _message(exc)
        return (
            f"model '{cls.name}': the remote server {cls.url} (model '{cls.remote_model}') "
            f"did not answer: {detail}"
        )

    @classmethod
    def describe_tensors(cls) -> tuple[list[Tensor], list[Tensor]]:
        if cls.inputs and cls.outputs:
            return list(cls.inputs), list(cls.outputs)
        client = cls._client(min(cls.timeout, 10.0))
        try:
            return cls._remote_tensors(client)
        finally:
            client.close()

    def load(self, ctx: LoadContext) -> None:
        cls = type(self)
        self.client = cls._client(cls.timeout)
        inputs, outputs = cls._remote_tensors(self.client)
        declared = {t.name: t for t in [*cls.inputs, *cls.outputs]}
        self.inputs = [declared.get(t.name, t) for t in inputs]
        self.outputs = [declared.get(t.name, t) for t in outputs]
        ctx.logger.info(
            "model '%s': forwarding to %s (%s)", ctx.model_name, cls.url, cls.remote_model
        )

    def infer_tensors(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException

        cls = type(self)
        request = []
        for tensor in self.inputs:
            if tensor.name not in inputs:
                continue
            array = inputs[tensor.name]
            item = http.InferInput(tensor.name, list(array.shape), tensor.datatype)
            item.set_data_from_numpy(array, binary_data=True)
            request.append(item)
        wanted = [http.InferRequestedOutput(t.name, binary_data=True) for t in self.outputs]
        try:
            result = self.client.infer(
                cls.remote_model, request, model_version=cls.remote_version, outputs=wanted
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if status.startswith("400") or "400" in status:
                raise InvalidInput(f"{cls.url} refused the request: {_message(exc)}") from None
            raise RuntimeError(self._unreachable(exc)) from None
        except Exception as exc:
            raise RuntimeError(self._unreachable(exc)) from None
        return {t.name: result.as_numpy(t.name) for t in self.outputs}

    def unload(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def _message(exc: BaseException) -> str:
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
