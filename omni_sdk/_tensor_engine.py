"""``TensorEngine``: engines whose model takes and returns named tensors (torch, onnx, triton).

numpy is imported only where arrays are made, so a plain ``Engine`` never needs it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field, create_model

from omni_sdk._engine import Engine, EngineDefinitionError, Signature
from omni_sdk._tensors import TensorSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["DATATYPES", "ModelLoadError", "Tensor", "TensorEngine"]

# v2 datatype → numpy dtype (little-endian, as the binary extension sends them).
DATATYPES: dict[str, str] = {
    "BOOL": "|b1",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BYTES": "|O",
}
_PYTHON_TYPES: dict[str, type] = {
    "BOOL": bool,
    "BYTES": str,
    "FP16": float,
    "FP32": float,
    "FP64": float,
}


class ModelLoadError(RuntimeError):
    """A model file or server an engine needs is missing or unreadable; the message names
    the model and the file, tensor or URL."""


@dataclass(frozen=True)
class Tensor:
    """One named v2 tensor of a tensor-native engine: ``Tensor("input_ids", "INT64", [-1, -1])``.

    ``shape`` uses ``-1`` for a dynamic dimension. With batching on, dimension 0 is the batch.
    ``pad`` is the value that fills this input's other dynamic dimensions when requests of
    different sizes share one batch (token ids and attention masks pad with 0); without it,
    only requests of the same shape share a batch.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    pad: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.datatype not in DATATYPES:
            raise EngineDefinitionError(
                f"tensor '{self.name}': datatype {self.datatype!r} is not a v2 datatype "
                f"({', '.join(DATATYPES)})"
            )
        if not all(isinstance(d, int) and d >= -1 for d in self.shape):
            raise EngineDefinitionError(
                f"tensor '{self.name}': shape {list(self.shape)} must hold integers, -1 for "
                "a dynamic dimension"
            )

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def spec(self) -> TensorSpec:
        return TensorSpec(
            name=self.name,
            datatype=self.datatype,
            shape=self.shape,
            element="tensor",
            rank=len(self.shape),
            required=not self.optional,
            accepted=(self.datatype,),
        )

    def python_type(self) -> Any:
        """The JSON shape of this tensor as a Python annotation: nested lists of scalars."""
        annotation: Any = _PYTHON_TYPES.get(self.datatype, int)
        for _ in self.shape:
            annotation = list[annotation]
        return annotation


class TensorEngine(Engine):
    """Base class of engines whose model works on named tensors.

    A subclass declares ``inputs`` and ``outputs`` (lists of ``Tensor``), or an engine reads
    them from its model file, and implements ``infer_tensors``. KServe v2 clients send and
    receive those tensors as they are (numpy arrays from the binary extension, no Python
    lists in between).

    ``/ai/run`` takes the tensors as JSON nested lists, unless the subclass implements
    ``preprocess(self, request: Req) -> dict[str, ndarray]`` (tokenising text, say) and
    ``postprocess(self, outputs, request: Req) -> Resp``: then the pydantic models ``Req`` and
    ``Resp`` are the friendly JSON of ``/ai/run`` while v2 still sees the raw tensors.

    Batching: with ``max_batch_size`` above 1, requests that arrive together are joined along
    dimension 0 (at most ``max_batch_size`` rows per call) and the outputs split back, so
    every input and output must have a dynamic dimension 0.
    """

    inputs: Sequence[Tensor] = ()
    outputs: Sequence[Tensor] = ()

    _signatures: ClassVar[dict[type[TensorEngine], Signature]] = {}

    def infer_tensors(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run the model on a batch: named input arrays in, named output arrays out."""
        raise NotImplementedError(f"{type(self).__name__} does not implement infer_tensors")

    def preprocess(self, request: Any) -> dict[str, NDArray[Any]]:
        """``/ai/run`` JSON (a validated request model) → input arrays. Default: the tensors."""
        raise NotImplementedError  # the runner decodes the JSON tensors itself

    def postprocess(self, outputs: dict[str, NDArray[Any]], request: Any) -> Any:
        """Output arrays → the ``/ai/run`` response. Default: the tensors as nested lists."""
        raise NotImplementedError  # the runner encodes the JSON tensors itself

    def infer(self, request: Any) -> Any:
        """One ``/ai/run`` request end to end (handy in tests; the runtime batches instead)."""
        outputs = self.infer_tensors(self.preprocess(request))
        return self.postprocess(outputs, request)

    def infer_batch(self, requests: list[Any]) -> list[Any]:
        """Several ``/ai/run`` requests, one at a time (the runtime's runner batches instead)."""
        return [self.infer(request) for request in requests]

    @classmethod
    def describe_tensors(cls) -> tuple[list[Tensor], list[Tensor]]:
        """The v2 inputs and outputs, known without loading (for discovery and metadata).

        Engines that read them from a model file or a remote server override this; after
        ``load`` the instance's ``inputs`` and ``outputs`` are what is served.
        """
        return list(cls.inputs), list(cls.outputs)

    @classmethod
    def package_file(cls, name: str | os.PathLike[str]) -> Path:
        """``name`` as a path: absolute as given, else beside the module defining the class."""
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        return Path(inspect.getfile(cls)).resolve().parent / path

    @classmethod
    def has_preprocess(cls) -> bool:
        return cls.preprocess is not TensorEngine.preprocess

    @classmethod
    def has_postprocess(cls) -> bool:
        return cls.postprocess is not TensorEngine.postprocess

    @classmethod
    def signature(cls) -> Signature:
        """v2 tensors from ``describe_tensors``; JSON models from pre/postprocess or the tensors."""
        cached = TensorEngine._signatures.get(cls)
        if cached is not None:
            return cached
        inputs, outputs = cls.describe_tensors()
        request_model = (
            _annotation(cls, "preprocess", "request")
            if cls.has_preprocess()
            else tensors_model(f"{cls.__name__}Inputs", inputs)
        )
        response_model = (
            _annotation(cls, "postprocess", "return")
            if cls.has_postprocess()
            else tensors_model(f"{cls.__name__}Outputs", outputs)
        )
        signature = Signature(
            request_model=request_model,
            response_model=response_model,
            inputs=[t.spec() for t in inputs],
            outputs=[t.spec() for t in outputs],
        )
        TensorEngine._signatures[cls] = signature
        return signature

    @classmethod
    def validate_definition(cls) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if cls.infer_tensors is TensorEngine.infer_tensors:
            raise EngineDefinitionError(f"{where} must implement infer_tensors")
        if cls.has_postprocess() and not cls.has_preprocess():
            raise EngineDefinitionError(
                f"{where} implements postprocess without preprocess: postprocess receives the "
                "request model that preprocess declares"
            )
        super().validate_definition()
        if cls.max_batch_size > 1:
            inputs, outputs = cls.describe_tensors()
            for tensor in [*inputs, *outputs]:
                if not tensor.shape or tensor.shape[0] != -1:
                    raise EngineDefinitionError(
                        f"{where} sets max_batch_size={cls.max_batch_size} but tensor "
                        f"'{tensor.name}' has shape {list(tensor.shape)}: batching joins "
                        "requests along dimension 0, which must be -1"
                    )


def tensors_model(name: str, tensors: Sequence[Tensor]) -> type[BaseModel]:
    """A pydantic model whose fields are the tensors as nested lists (for JSON schemas)."""
    fields: dict[str, Any] = {}
    for index, tensor in enumerate(tensors):
        default = None if tensor.optional else ...
        description = f"{tensor.datatype} tensor of shape {list(tensor.shape)}"
        annotation = tensor.python_type()
        if tensor.optional:
            annotation = annotation | None
        fields[f"tensor_{index}"] = (
            annotation,
            Field(default, alias=tensor.name, description=description),
        )
    return create_model(name, **fields)


def _annotation(cls: type[TensorEngine], method_name: str, role: str) -> type[BaseModel]:
    method = getattr(cls, method_name)
    where = f"{cls.__module__}.{cls.__qualname__}.{method_name}"
    parameters = [
        p for p in inspect.signature(method).parameters.values() if p.name not in ("self",)
    ]
    if role == "request":
        raw: Any = parameters[-1].annotation if parameters else inspect.Parameter.empty
    else:
        raw = inspect.signature(method).return_annotation
    if isinstance(raw, str):
        try:
            raw = eval(raw, vars(inspect.getmodule(method)), dict(vars(cls)))
        except Exception as exc:
            raise EngineDefinitionError(
                f"{where}: cannot read its {role} annotation: {exc}"
            ) from exc
    if not (isinstance(raw, type) and issubclass(raw, BaseModel)):
        example = (
            "def preprocess(self, request: Req) -> dict[str, np.ndarray]"
            if role == "request"
            else "def postprocess(self, outputs, request: Req) -> Resp"
        )
        raise EngineDefinitionError(
            f"{where} must annotate its {role} type with a pydantic model, e.g. `{example}`"
        )
    return raw
