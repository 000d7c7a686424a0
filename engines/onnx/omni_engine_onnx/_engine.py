"""``OnnxEngine``: an onnxruntime session behind Omni's tensor API."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from omni_sdk import LoadContext, ModelLoadError, Tensor, TensorEngine

__all__ = ["OnnxEngine", "cuda_usable", "tensors_of_session"]

# ONNX element types (as onnxruntime names them) → v2 datatypes.
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@functools.cache
def cuda_usable() -> bool:
    """Whether a CUDA device really answers (asking onnxruntime for CUDA without one logs
    an error and falls back, so the driver is asked first)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def tensors_of_session(session: Any, where: str) -> tuple[list[Tensor], list[Tensor]]:
    """The v2 tensors of an onnxruntime session's graph; symbolic dimensions become -1."""

    def convert(arg: Any, role: str) -> Tensor:
        datatype = _DATATYPES.get(arg.type)
        if datatype is None:
            supported = ", ".join(t.removeprefix("tensor(").rstrip(")") for t in _DATATYPES)
            raise ModelLoadError(
                f"{where}: {role} '{arg.name}' has type {arg.type}, which Omni cannot serve "
                f"(supported element types: {supported})"
            )
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
        return Tensor(arg.name, datatype, tuple(shape))

    inputs = [convert(arg, "input") for arg in session.get_inputs()]
    outputs = [convert(arg, "output") for arg in session.get_outputs()]
    return inputs, outputs


# A graph's tensors, by engine class and file (size, mtime): describing opens a session.
_DESCRIBED: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
# The session that described a graph, for the load that follows in the same process to take.
_OPENED: dict[tuple[Any, ...], Any] = {}


def _file_key(engine: type, path: Path) -> tuple[Any, ...]:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return (engine, str(path), stat.st_size, stat.st_mtime_ns)


def _cpu_options(threads: int, optimize: bool = True, prepack: bool = False) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; the worker's log is the model's log
    if not optimize:  # only the names and types are wanted
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not (optimize and prepack):
        # Weights stay where onnxruntime mapped them (external data): shared by every replica.
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class OnnxEngine(TensorEngine):
    """Serve an ONNX graph. A subclass sets ``model_file`` (relative paths are beside the
    module that defines the subclass; override the ``model_path`` classmethod to compute or
    build the file).

    Inputs and outputs, with their datatypes and dynamic dimensions, are read from the graph
    and become the v2 metadata; declare ``inputs``/``outputs`` only to add what a graph cannot
    say (``pad`` values for batching, say) — names and datatypes must then match the graph.

    The CUDA execution provider runs the graph when ``ctx.device`` is CUDA and a GPU really
    answers, the CPU provider otherwise; intra-op threads follow ``ctx.resources.cpus``.
    """

    model_file: ClassVar[str] = ""
    # Repack MatMul weights into onnxruntime's own layout at load: about 10 % faster on small
    # batches, but each replica then holds a private copy of them. Off, the weights stay in the
    # pages onnxruntime maps from the file (when the graph keeps them as external data), which
    # every replica of the model on the node shares.
    prepack_weights: ClassVar[bool] = False

    @classmethod
    def model_path(cls) -> Path:
        if not cls.model_file:
            raise ModelLoadError(f"model '{cls.name}': set model_file to the .onnx file")
        return cls.package_file(cls.model_file)

    @classmethod
    def describe_tensors(cls) -> tuple[list[Tensor], list[Tensor]]:
        if cls.inputs and cls.outputs:
            return list(cls.inputs), list(cls.outputs)
        path = cls.model_path()
        key = _file_key(cls, path)
        if key and key in _DESCRIBED:  # asked again while the model is registered and loaded
            return _DESCRIBED[key]
        # The session that reads the graph is the one a one-CPU load would open: a worker's
        # load takes it rather than opening the file twice (see load).
        reusable = cls.session_options is OnnxEngine.session_options
        options = (
            _cpu_options(1, prepack=cls.prepack_weights)
            if reusable
            else _cpu_options(1, optimize=False)
        )
        session = cls._open(options, ["CPUExecutionProvider"], path)
        described = tensors_of_session(session, f"model '{cls.name}'")
        if key:
            _DESCRIBED[key] = described
            if reusable:
                _OPENED[key] = session
        return described

    @classmethod
    def _open(cls, options: Any, providers: list[Any], path: Path | None) -> Any:
        import onnxruntime

        path = path or cls.model_path()
        if not path.is_file():
            raise ModelLoadError(f"model '{cls.name}': model file {path} does not exist")
        try:
            return onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(
                f"model '{cls.name}': onnxruntime cannot load {path}: {exc}"
            ) from exc

    def providers(self, ctx: LoadContext) -> list[Any]:
        """Execution providers, best first: CUDA when asked for and really usable, then CPU."""
        import onnxruntime

        if ctx.device.startswith("cuda") and cuda_usable():
            available = onnxruntime.get_available_providers()
            if "CUDAExecutionProvider" in available:
                return [
                    ("CUDAExecutionProvider", self.cuda_provider_options(ctx)),
                    "CPUExecutionProvider",
                ]
            ctx.logger.warning(
                "model '%s': CUDA was asked for but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu); running on CPU",
                ctx.model_name,
            )
        return ["CPUExecutionProvider"]

    def cuda_provider_options(self, ctx: LoadContext) -> dict[str, str]:
        """CUDA provider options: the device, and libomnicuda as the external allocator
        (``gpu_external_alloc/free/empty_cache``), so the session allocates through the hooks."""
        index = ctx.device.partition(":")[2] or "0"
        options = {"device_id": index}
        try:
            import omni_cstub
        except ImportError:
            ctx.logger.warning(
                "model '%s': omni-cstub is not installed, so its GPU memory is not limited",
                ctx.model_name,
            )
            return options
        addresses = omni_cstub.Hooks().ort_allocator_addresses()
        options.update({name: str(address) for name, address in addresses.items()})
        return options

    def session_options(self, ctx: LoadContext) -> Any:
        return _cpu_options(max(1, int(ctx.resources.cpus)), prepack=self.prepack_weights)

    def load(self, ctx: LoadContext) -> None:
        path = type(self).model_path()
        providers = self.providers(ctx)
        session = None
        if (
            providers == ["CPUExecutionProvider"]
            and type(self).session_options is OnnxEngine.session_options
            and max(1, int(ctx.resources.cpus)) == 1
        ):
            session = _OPENED.pop(_file_key(type(self), path), None)
        self.session: Any = session or self._open(self.session_options(ctx), providers, path)
        for key in [k for k in _OPENED if k[0] is type(self)]:
            del _OPENED[key]  # (another file by now: not to be held)
        label = f"model '{ctx.model_name}' ({path})"
        inputs, outputs = tensors_of_session(self.session, label)
        self.inputs = _merge(inputs, type(self).inputs, label, "input")
        self.outputs = _merge(outputs, type(self).outputs, label, "output")
        self.output_names = [t.name for t in self.outputs]
        self.string_inputs = {t.name for t in self.inputs if t.datatype == "BYTES"}
        ctx.logger.info(
            "model '%s': %s on %s", ctx.model_name, path.name, self.session.get_providers()[0]
        )

    def infer_tensors(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        feed = {
            name: _strings(array) if name in self.string_inputs else array
            for name, array in inputs.items()
        }
        results = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, results, strict=True))

    def unload(self) -> None:
        self.session = None


def _merge(graph: list[Tensor], declared: Any, where: str, role: str) -> list[Tensor]:
    """The graph's tensors, with what the subclass declared (pad values) laid over them."""
    if not declared:
        return graph
    by_name = {t.name: t for t in graph}
    merged = []
    for tensor in declared:
        found = by_name.get(tensor.name)
        if found is None:
            raise ModelLoadError(
                f"{where}: declares {role} '{tensor.name}', which the graph does not have "
                f"(its {role}s: {', '.join(by_name)})"
            )
        if found.datatype != tensor.datatype:
            raise ModelLoadError(
                f"{where}: {role} '{tensor.name}' is {found.datatype} in the graph, "
                f"declared {tensor.datatype}"
            )
        merged.append(tensor)
    return merged


def _strings(array: NDArray[Any]) -> NDArray[Any]:
    flat = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    return np.array(flat, dtype=object).reshape(array.shape)
