"""What a pre-warmed process may import ahead of the sandbox, and what it may not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omni_runtime.workers.prewarm import trusted_modules


def test_only_modules_of_the_runtimes_own_environment_are_trusted(tmp_path: Path) -> None:
    package = tmp_path / "model"
    package.mkdir()
    (package / "my_model.py").write_text("")
    sys.path.insert(0, str(package))
    try:
        names = ["json", "pydantic", "my_model", "no_such_module", "_private", "sys", "os.path"]
        trusted = trusted_modules(names, package)
    finally:
        sys.path.remove(str(package))
    assert trusted == ["json", "pydantic"]


def run_prewarm(tmp_path: Path, trusted: Path) -> bool:
    """Start a pre-warmed process asked to preload a module that leaves a mark; did it?"""
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    mark = tmp_path / "imported"
    mark.unlink(missing_ok=True)
    (modules / "marker.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_sdk.prewarm", "--fd", str(child.fileno()),
         "--preload", "marker", "--trusted", str(trusted)],
        pass_fds=(child.fileno(),),
        env=dict(os.environ, PYTHONPATH=str(modules)),
    )  # fmt: skip
    child.close()
    parent.close()  # the runtime goes away: it exits
    assert process.wait(30) == 0
    return mark.exists()


def test_a_module_from_outside_the_trusted_layer_is_never_preloaded(tmp_path: Path) -> None:
    assert not run_prewarm(tmp_path, tmp_path / "elsewhere")
    assert run_prewarm(tmp_path, tmp_path / "modules")  # the same module, when trusted


def test_a_model_module_installed_beside_the_runtime_is_not_trusted(tmp_path: Path) -> None:
    package = tmp_path / "model"
    package.mkdir()
    # Its entry point names "json": as if the model's module had been installed into the
    # runtime's own environment, where the origin check alone would trust it.
    (package / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "1"\n[project.entry-points.omni]\nx = "json.decoder"\n'
    )
    assert trusted_modules(["json", "pydantic"], package) == ["pydantic"]


def test_what_a_trusted_module_imports_cannot_come_from_the_models_environment(
    tmp_path: Path,
) -> None:
    trusted = tmp_path / "trusted"
    model_env = tmp_path / "model-env"
    trusted.mkdir()
    model_env.mkdir()
    mark = tmp_path / "model-code-ran"
    (trusted / "base_module.py").write_text(
        "try:\n    import optdep\nexcept ImportError:\n    pass\n"
    )
    (model_env / "optdep.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_sdk.prewarm", "--fd", str(child.fileno()),
         "--preload", "base_module", "--trusted", str(trusted)],
        pass_fds=(child.fileno(),),
        env=dict(os.environ, PYTHONPATH=f"{model_env}:{trusted}"),
    )  # fmt: skip
    child.close()
    parent.close()
    process.wait(30)
    assert not mark.exists()


def test_only_a_real_child_of_the_prewarmed_process_is_believed() -> None:
    """It runs the model's environment's code: a pid it names is checked, never taken."""
    import types

    from omni_runtime.workers.prewarm import PrewarmedProcess

    prewarmed = PrewarmedProcess(sys.executable, [])
    prewarmed.process = types.SimpleNamespace(pid=os.getpid())  # type: ignore[assignment]
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert prewarmed._own_child(child.pid) == child.pid
        for named in (os.getppid(), 1, -5, "12", True):
            with pytest.raises(OSError, match="pre-warmed process named"):
                prewarmed._own_child(named)
    finally:
        child.kill()
        child.wait()


def refusal(tmp_path: Path, source: str) -> dict[str, str] | None:
    """Preload a trusted module with ``source``; what the pre-warmed process says of it."""
    import json

    trusted = tmp_path / "trusted"
    trusted.mkdir(exist_ok=True)
    (trusted / "framework.py").write_text(source)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_sdk.prewarm", "--fd", str(child.fileno()),
         "--preload", "-", "--trusted", str(trusted)],
        pass_fds=(child.fileno(),), stdin=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(trusted)),
    )  # fmt: skip
    child.close()
    assert process.stdin is not None
    process.stdin.write(b"framework\n")
    process.stdin.close()
    parent.settimeout(10)  # it preloads one small module: a refusal comes at once
    try:
        message = parent.recv(65536)  # a refusal, or nothing until we go away
    except TimeoutError:
        message = b""
    parent.close()
    assert process.wait(30) == 0
    return json.loads(message) if message else None


def test_a_frameworks_own_module_objects_are_not_taken_for_tampering(tmp_path: Path) -> None:
    # As torch makes torch.ops: a module object whose __file__ is a bare name.
    made = (
        "import sys, types\n"
        "ops = types.ModuleType('framework.ops')\n"
        "ops.__file__ = '_ops.py'\n"
        "sys.modules['framework.ops'] = ops\n"
    )
    assert refusal(tmp_path, made) is None
    # A module that really came from elsewhere still is.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "planted.py").write_text("")
    said = refusal(tmp_path, f"import sys\nsys.path.append({str(elsewhere)!r})\nimport planted\n")
    assert said is not None and said["kind"] == "outside_base", said
    assert f"planted was imported from {elsewhere}" in said["refused"]


def test_a_module_that_starts_a_thread_is_named_and_refused(tmp_path: Path) -> None:
    said = refusal(
        tmp_path,
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True, name='poller').start()\n",
    )
    assert said is not None
    assert said["kind"] == "threads" and said["module"] == "framework"
    assert "importing framework started a thread (poller)" in said["refused"]
    assert refusal(tmp_path, "import threading\n") is None  # no thread: it serves


def test_a_frameworks_first_use_caches_are_filled_for_the_forks(tmp_path: Path) -> None:
    """transformers fills a table on its first from_pretrained in a process (0.5 s): the
    pre-warmed process fills it, calling the base layer's own function, so forks inherit it."""
    trusted = tmp_path / "trusted"
    package = trusted / "transformers"
    package.mkdir(parents=True)
    mark = tmp_path / "warmed"
    (package / "__init__.py").write_text("")
    (package / "conversion_mapping.py").write_text(
        "def get_checkpoint_conversion_mapping(model_type):\n"
        f"    open({str(mark)!r}, 'w').write(model_type)\n"
    )
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_sdk.prewarm", "--fd", str(child.fileno()),
         "--preload", "transformers,transformers.conversion_mapping", "--trusted", str(trusted)],
        pass_fds=(child.fileno(),), env=dict(os.environ, PYTHONPATH=str(trusted)),
    )  # fmt: skip
    child.close()
    deadline = time.monotonic() + 30
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.close()
    assert process.wait(30) == 0
    assert mark.read_text() == "bert"


def test_what_a_worker_says_it_imported_is_looked_at_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker runs the model's code: a list of a million made-up packages must not keep the
    runtime looking them up."""
    import importlib.util

    from omni_runtime.workers import prewarm

    looked: list[str] = []
    find_spec = importlib.util.find_spec

    def counting(name: str, *args: object) -> object:
        looked.append(name)
        return find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", counting)
    names = ["json", "pydantic.fields", *(f"made_up_{i}.x" for i in range(50_000)), "x" * 300]
    kept = trusted_modules(names, tmp_path)
    assert kept == ["json", "pydantic.fields"]
    assert len(looked) <= prewarm.MAX_PACKAGES
