"""``TorchEngine``: a PyTorch model behind Omni's tensor API."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray

from omni_sdk import LoadContext, ModelLoadError, TensorEngine

__all__ = ["TorchEngine", "install_cuda_allocator"]


def install_cuda_allocator(ctx: LoadContext) -> Any:
    """A ``torch.cuda.MemPool`` over libomnicuda's allocator, or None without omni-cstub.

    Allocations made while the pool is in use (``torch.cuda.use_mem_pool``) go through the
    hooks: managed memory, the model's ``gpu_memory`` quota, usage the runtime can read. Torch
    keeps caching inside the pool. The worker is also started with libomnicuda in LD_PRELOAD,
    which catches whatever allocates outside the pool.
    """
    try:
        import omni_cstub
    except ImportError:
        ctx.logger.warning(
            "model '%s': omni-cstub is not installed, so its GPU memory is not limited",
            ctx.model_name,
        )
        return None
    path, alloc, free = omni_cstub.Hooks().torch_allocator_paths()
    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, alloc, free)
    return torch.cuda.MemPool(allocator.allocator())  # type: ignore[no-untyped-call]


class TorchEngine(TensorEngine):
    """Serve a PyTorch model. Set one way to load it:

    - ``model_file = "model.pt2"``: a ``torch.export`` program (``torch.export.save``),
    - ``model_file = "model.pt"``: a TorchScript module (``torch.jit.save``), or
    - ``weights_file = "model.safetensors"`` and implement ``build_module()``, which returns
      the ``torch.nn.Module`` the weights load into (the module factory).

    Relative paths are relative to the module that defines the subclass; override
    ``model_path``/``weights_path`` to compute them. Declare ``inputs`` and ``outputs`` as
    ``Tensor`` lists: the model is called with the inputs as positional tensors in that order
    and returns a tensor, a tuple of tensors (in ``outputs`` order) or a dict by name.

    The model runs under ``torch.inference_mode`` on ``ctx.device`` (``cpu`` or ``cuda``)
    with ``ctx.resources.cpus`` threads.
    """

    model_file: ClassVar[str] = ""
    weights_file: ClassVar[str] = ""

    def build_module(self) -> torch.nn.Module:
        """The module factory: an ``nn.Module`` whose state dict ``weights_file`` holds."""
        raise NotImplementedError

    def adapt_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename or drop tensors of ``weights_file`` before ``load_state_dict``."""
        return weights

    def model_path(self, ctx: LoadContext) -> str:
        return str(self.package_file(self.model_file)) if self.model_file else ""

    def weights_path(self, ctx: LoadContext) -> str:
        return str(self.package_file(self.weights_file)) if self.weights_file else ""

    def load(self, ctx: LoadContext) -> None:
        self.label = f"model '{ctx.model_name}'"
        self.device = torch.device(ctx.device)
        torch.set_num_threads(max(1, int(ctx.resources.cpus)))
        self.pool = install_cuda_allocator(ctx) if self.device.type == "cuda" else None
        with self._allocating():
            self.module = self._load_module(ctx)
        self.input_names = [t.name for t in self.inputs]
        self.output_names = [t.name for t in self.outputs]
        ctx.logger.info("%s: loaded on %s", self.label, self.device)

    def _load_module(self, ctx: LoadContext) -> Any:
        path = self.model_path(ctx)
        weights = self.weights_path(ctx)
        if bool(path) == bool(weights):
            raise ModelLoadError(
                f"{self.label}: set exactly one of model_file (a .pt2 or TorchScript file) "
                "or weights_file (safetensors, with build_module)"
            )
        if weights:
            return self._load_factory(weights)
        if not _is_file(path):
            raise ModelLoadError(f"{self.label}: model file {path} does not exist")
        if path.endswith(".pt2"):
            try:
                program = torch.export.load(path)
            except Exception as exc:
                raise ModelLoadError(
                    f"{self.label}: cannot read {path} as a torch.export program: {exc}"
                ) from exc
            module = program.module()
            return module.to(self.device)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")
                module = torch.jit.load(path, map_location=self.device)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ModelLoadError(
                f"{self.label}: cannot read {path} as a TorchScript module: {exc}"
            ) from exc
        return module.eval()

    def _load_factory(self, path: str) -> torch.nn.Module:
        if type(self).build_module is TorchEngine.build_module:
            raise ModelLoadError(
                f"{self.label}: weights_file needs build_module() to return the module"
            )
        if not _is_file(path):
            raise ModelLoadError(f"{self.label}: weights file {path} does not exist")
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")  # tensors over a private map of the file
        except Exception as exc:
            raise ModelLoadError(f"{self.label}: cannot read {path} as safetensors: {exc}") from exc
        # Every parameter comes from the file (a missing one is an error below), so the random
        # initialisation build_module() would do is skipped: most of a module's build time.
        with _no_random_init():
            module = self.build_module()
        state = _fitted(self.adapt_weights(state), module.state_dict())
        # assign: the module keeps the file's tensors rather than copying them into its own.
        # Their pages are the page cache's, shared by every replica on the node until written.
        result = module.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"{self.label}: {path} does not fit build_module(): missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
                "(adapt_weights can rename or drop tensors)"
            )
        return module.to(self.device).eval()

    def infer_tensors(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        args = [
            torch.from_numpy(_writable(inputs[name])).to(self.device)
            for name in self.input_names
            if name in inputs
        ]
        with torch.inference_mode(), self._allocating():
            result = self.module(*args)
        return self._outputs(result)

    def _allocating(self) -> contextlib.AbstractContextManager[Any]:
        """CUDA allocations in this scope come from the libomnicuda pool, when there is one."""
        pool = getattr(self, "pool", None)
        return torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext()

    def _outputs(self, result: Any) -> dict[str, NDArray[Any]]:
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            pairs = [(name, result[name]) for name in self.output_names if name in result]
        elif isinstance(result, (tuple, list)):
            if len(result) < len(self.output_names):
                raise TypeError(
                    f"the module returned {len(result)} tensors for outputs {self.output_names}"
                )
            pairs = list(zip(self.output_names, result, strict=False))
        else:
            raise TypeError(f"the module returned {type(result).__name__}, expected tensors")
        return {name: value.detach().cpu().numpy() for name, value in pairs}

    def unload(self) -> None:
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# In-place random fills that weight initialisers use (torch.nn.init and the frameworks' own).
_RANDOM_FILLS = (
    "normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
    "log_normal_", "cauchy_",
)  # fmt: skip


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Random fills do nothing while a module whose every weight comes from a file is built.

    The worker builds its model on one thread before it serves anything, so replacing the
    methods for that while is seen by nothing else.
    """
    saved = {name: torch.Tensor.__dict__.get(name) for name in _RANDOM_FILLS}

    def unchanged(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    for name in _RANDOM_FILLS:
        setattr(torch.Tensor, name, unchanged)
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


def _fitted(
    state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The file's tensors, converted where the module holds another dtype (only those copy)."""
    fitted = {}
    for key, value in state.items():
        mine = own.get(key)
        if mine is not None and mine.dtype != value.dtype and value.is_floating_point():
            value = value.to(mine.dtype)
        fitted[key] = value
    return fitted


def _is_file(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def _writable(array: NDArray[Any]) -> NDArray[Any]:
    # Arrays decoded from a request body are read-only views; torch wants to own writable memory.
    return array if array.flags.writeable else np.array(array)
