"""Model control's ``files``: a model loaded from the files a load request carries, as
Triton's explicit mode loads an override model directory (``load_model(name, config=...,
files={"file:1/model.onnx": ...})``).

The files and the ``config`` (Triton's model configuration, as JSON) become a zero-code ONNX
package under the state directory (``STATE/loaded/``), one directory per content, so that the
version being replaced keeps its own files while it drains. A model of that name already
served is rolled out to it (no request fails; the same files again just load it); a new name
is served from it. What cannot be served is refused with 400 naming the file or field: a path
that is not relative and plain, more than ``MAX_FILES`` files or ``max_bytes`` in all, a
platform other than ONNX Runtime's, no ONNX graph among the files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import shutil
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from omni_runtime.discovery import Discovery
from omni_runtime.scheduler import Controller, ModelDirectory
from omni_runtime.scheduler.rollout import Rollouts
from omni_runtime.server.model_control import ControlError

__all__ = ["MAX_FILES", "ModelFiles", "has_files"]

MAX_FILES = 64
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ONNX = {"onnxruntime_onnx", "onnxruntime"}


def has_files(parameters: Any) -> bool:
    """Whether a load request's parameters carry model files (``file:...``)."""
    return isinstance(parameters, dict) and any(str(k).startswith("file:") for k in parameters)


class ModelFiles:
    """Serves models loaded from files (see the module's description)."""

    def __init__(
        self,
        root: Path,
        discover: Callable[[list[Path]], Awaitable[Discovery]],
        controller: Controller,
        directory: ModelDirectory,
        rollouts: Rollouts,
        hide: Callable[[Path], None] = lambda path: None,
    ) -> None:
        self.root = root
        self.discover = discover
        self.controller = controller
        self.directory = directory
        self.rollouts = rollouts
        self.hide = hide
        self.max_bytes = int(controller.settings.max_body_size)
        self._lock = asyncio.Lock()  # one load from files at a time

    async def load(self, name: str, parameters: dict[str, Any]) -> str:
        """Serve ``name`` from the request's files; "" when it loaded, else why not.
        ``ControlError`` (a 400 naming the file or field) for a request that cannot be."""
        files = _files(parameters, self.max_bytes)
        config = _config(name, parameters)
        package = self._package(name, files, config)
        async with self._lock:
            discovery = await self.discover([package])
            if discovery.failures:
                return discovery.failures[0].error
            spec = next((s for s in discovery.models if s.name == name), None)
            if spec is None:
                return f"the package made of its files registers no model '{name}'"
            self.hide(package)
            current = self.controller.models.get(name)
            if current is None:
                self.controller.add(spec)
            elif current.spec.version != spec.version:
                rollout = await self.rollouts.replace(name, spec, str(package))
                if rollout is None:
                    return "an earlier version of it is still draining; try again shortly"
                deadline = time.monotonic() + self.controller.settings.load_timeout
                while not rollout.finished and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if rollout.state != "promoted":
                    return f"its rollout to the new files is {rollout.state}: {rollout.reason}"
        handle = self.directory.get(name)
        return "" if handle is None else await self.directory.load(handle)

    def _package(self, name: str, files: dict[str, bytes], config: dict[str, Any]) -> Path:
        """The zero-code package of ``files`` (written once per content)."""
        graph = _graph(files, config)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        version = f"files-{digest.hexdigest()[:12]}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
        package = self.root / f"{slug}-{zlib.crc32(name.encode()):08x}-{version}"
        if package.is_dir():
            return package
        staging = package.with_name(package.name + ".writing")
        shutil.rmtree(staging, ignore_errors=True)
        for path, data in files.items():
            target = staging.joinpath(*PurePosixPath(path).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        batch = config.get("max_batch_size", 0)
        lines = [
            "# Written by omni-runtime from a load request's files (model control).",
            "[model]",
            f"name = {json.dumps(name)}",
            'task = "tensor-inference"',
            'kind = "onnx"',
            f"file = {json.dumps(graph)}",
            f"version = {json.dumps(version)}",
        ]
        if isinstance(batch, int) and not isinstance(batch, bool) and batch > 1:
            lines.append(f"max_batch_size = {batch}")
        (staging / "omni.toml").write_text("\n".join(lines) + "\n")
        staging.rename(package)
        return package


def _files(parameters: dict[str, Any], max_bytes: int) -> dict[str, bytes]:
    """The request's files by relative path, decoded (base64 over HTTP, bytes over gRPC)."""
    files: dict[str, bytes] = {}
    total = 0
    for key, value in parameters.items():
        if not str(key).startswith("file:"):
            continue
        path = str(key)[len("file:") :]
        parts = PurePosixPath(path).parts
        if not parts or path.startswith("/") or not all(_PART.match(p) for p in parts):
            raise ControlError(
                f"file {path!r}: a file's path must be relative, of plain names (letters, "
                "digits, '.', '_', '-'; no '..')"
            )
        if isinstance(value, str):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ControlError(f"file {path!r}: its content is not base64") from None
        elif isinstance(value, bytes):
            data = value
        else:
            raise ControlError(f"file {path!r}: its content must be base64 text")
        total += len(data)
        if len(files) >= MAX_FILES or total > max_bytes:
            raise ControlError(
                f"more than {MAX_FILES} files or {max_bytes} bytes of them (server.max_body_size)"
            )
        files[path] = data
    return files


def _config(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    raw = parameters.get("config")
    if not isinstance(raw, str | bytes) or not raw:
        raise ControlError("'config' (the model's configuration, as JSON) must come with files")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ControlError(f"'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ControlError("'config' must be a JSON object (a model configuration)")
    if config.get("name", name) != name:
        raise ControlError(f"config field 'name' is {config['name']!r}, not '{name}'")
    platform = config.get("platform") or config.get("backend")
    if platform not in _ONNX:
        raise ControlError(
            f"config field 'platform' is {platform!r}: models loaded from files are ONNX "
            "graphs ('onnxruntime_onnx'); serve other models as packages"
        )
    return config


def _graph(files: dict[str, bytes], config: dict[str, Any]) -> str:
    """The path of the graph to serve: ``default_model_filename`` (``model.onnx``) in the
    highest version directory that has it, else the only ``.onnx`` file."""
    filename = str(config.get("default_model_filename") or "model.onnx")
    versions = sorted(
        (int(p.split("/")[0]), p) for p in files if re.fullmatch(rf"\d+/{re.escape(filename)}", p)
    )
    if versions:
        return versions[-1][1]
    graphs = [p for p in files if p.endswith(".onnx")]
    if len(graphs) == 1:
        return graphs[0]
    raise ControlError(
        f"no '<version>/{filename}' among the files ({', '.join(sorted(files))}), and not "
        "exactly one .onnx file"
    )
