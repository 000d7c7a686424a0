from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from omni_runtime.config import ConfigError, ServerSettings, load_omni_file
from omni_runtime.discovery import DiscoveryError, config_files, discover_all, find_packages
from omni_sdk._tensors import DEFAULT_MAX_TENSOR_ELEMENTS


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[models."@a/b".resources]\nmemory = "lots"\n',
            "field 'models.\"@a/b\".resources.memory': expected a size",
        ),
        ('[models."@a/b".scaling]\nmax_replicas = 0\n', "scaling.max_replicas"),
        (
            '[models."@a/b".resources]\nram = "1GiB"\n',
            "unknown field 'models.\"@a/b\".resources.ram' "
            "(allowed here: memory, gpu_memory, cpus)",
        ),
        (
            "[server]\nmax_body = 1\n",
            "(allowed here: max_body_size, load_timeout, drain_timeout, shm_threshold, "
            "heartbeat_timeout, body_timeout, max_header_size, max_tensor_elements, "
            "batch_max_size, batch_retention, max_connections, cache_quota, source_builds, "
            "grpc_server, busy_poll)",
        ),
        ("[wat]\n", "unknown field 'wat' (allowed here: server, scheduler, models, model)"),
        (
            '[scheduler]\ngpus = {"gpu0" = "80GiB"}\n',
            "field 'scheduler.gpus': a GPU is named like 'cuda:0', not 'gpu0'",
        ),
        (
            '[scheduler]\ngpus = {"cuda:0" = "big"}\n',
            "field 'scheduler.gpus.cuda:0': expected a size",
        ),
        ("models = [", "not valid TOML"),
        (
            '[models."@a/b".sequence]\nstrat = "START"\n',
            "unknown field 'models.\"@a/b\".sequence.strat' (allowed here: start, end, ready, "
            "correlation_id, idle_timeout, max_sequences)",
        ),
        (
            '[model]\nname = "a"\ntask = "t"\nkind = "onnx"\n'
            '[model.sequence]\nidle_timeout = "x"\n',
            "field 'model.sequence.idle_timeout': expected a duration",
        ),
    ],
)
def test_errors_name_file_field_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path / "omni.toml", text)
    with pytest.raises(ConfigError) as info:
        load_omni_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_package_file_overrides_repository_file(tmp_path: Path, echo_package: Path) -> None:
    repository = tmp_path / "repo"
    package = repository / "echo"
    package.mkdir(parents=True)
    for item in echo_package.iterdir():
        if item.is_file():
            (package / item.name).write_bytes(item.read_bytes())
    _write(
        repository / "omni.toml",
        '[models."@test/echo".resources]\nmemory = "3GiB"\ncpus = 2\n'
        '[models."@test/echo".scaling]\nmin_replicas = 2\n',
    )
    _write(package / "omni.toml", '[models."@test/echo".resources]\nmemory = "512MiB"\n')
    packages = find_packages([repository])
    assert packages == [package]
    discovery = asyncio.run(discover_all(packages, config_files([repository])))
    assert discovery.failures == []
    echo = next(m for m in discovery.models if m.name == "@test/echo")
    assert echo.resources.memory == 512 << 20  # the package's own file wins
    assert (
        echo.resources.cpus == 2
    )  # the repository's file still applies where the package's is silent
    assert echo.scaling.min_replicas == 2
    gate = next(m for m in discovery.models if m.name == "@test/gate")
    assert gate.scaling.target_ongoing_requests == 1  # the engine's own default


def test_find_packages_errors(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="does not exist"):
        find_packages([tmp_path / "missing"])
    with pytest.raises(DiscoveryError, match="holds no model package"):
        find_packages([tmp_path])


@pytest.mark.parametrize(
    ("pyproject", "module", "message"),
    [
        ('[project]\nname = "p"\n', None, "registers no engine: add [project.entry-points.omni]"),
        ("[project\n", None, "is not valid TOML"),
        (
            '[project]\nname = "p"\n[project.entry-points.omni]\np = "p_mod"\n',
            "def broken(:\n",
            "entry point p = 'p_mod' failed to import: SyntaxError",
        ),
        (
            '[project]\nname = "p"\n[project.entry-points.omni]\np = "p_mod"\n',
            "x = 1\n",
            "registers no engine",
        ),
    ],
)
def test_broken_packages_fail_alone(
    tmp_path: Path, echo_package: Path, pyproject: str, module: str | None, message: str
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "pyproject.toml", pyproject)
    if module is not None:
        _write(bad / "p_mod.py", module)
    discovery = asyncio.run(discover_all([bad, echo_package], {}))
    assert [f.package_dir for f in discovery.failures] == [bad]
    assert message in discovery.failures[0].error
    assert str(bad) in discovery.failures[0].error
    assert "@test/echo" in {m.name for m in discovery.models}


def test_the_same_model_in_two_packages(tmp_path: Path, echo_package: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in echo_package.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    # Neither is served: the one that sorts first would take the other's traffic and secrets.
    with pytest.raises(DiscoveryError) as info:
        asyncio.run(discover_all([echo_package, copy], {}))
    assert f"'@test/echo' is registered by both {echo_package} and {copy}" in str(info.value)


def test_a_package_file_never_touches_a_neighbours_models(
    tmp_path: Path, echo_package: Path
) -> None:
    repository = tmp_path / "repo"
    mine, neighbour = repository / "mine", repository / "neighbour"
    shutil.copytree(echo_package, mine)
    shutil.copytree(echo_package.parent / "hog-model", neighbour)
    (mine / "omni.toml").unlink(missing_ok=True)
    _write(neighbour / "omni.toml", '[models."@test/echo".resources]\nmemory = "64MiB"\n')
    packages = find_packages([repository])
    discovery = asyncio.run(discover_all(packages, config_files([repository])))
    echo = next(m for m in discovery.models if m.name == "@test/echo")
    assert echo.resources.memory == 2 << 30  # the engine's default, not the neighbour's file


def test_server_limits(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "omni.toml",
        '[server]\nbody_timeout = "250ms"\nmax_header_size = "32KiB"\nmax_tensor_elements = 10\n',
    )
    server = load_omni_file(path).server
    assert server is not None
    assert (server.body_timeout, server.max_header_size, server.max_tensor_elements) == (
        0.25,
        32 << 10,
        10,
    )
    defaults = ServerSettings()
    assert (defaults.body_timeout, defaults.max_header_size) == (30.0, 16 << 10)
    assert defaults.max_tensor_elements == DEFAULT_MAX_TENSOR_ELEMENTS
    for bad in ("body_timeout = 0", "max_header_size = 0", "max_tensor_elements = -1"):
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            load_omni_file(_write(tmp_path / "omni.toml", f"[server]\n{bad}\n"))


def test_sequence_controls_hide_their_inputs_and_must_name_real_ones(
    tmp_path: Path, echo_package: Path
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(echo_package, repository / "echo")
    path = _write(
        repository / "omni.toml",
        '[models."@test/echo".sequence]\nstart = "flag"\ncorrelation_id = "text"\n',
    )
    packages = find_packages([repository])
    discovery = asyncio.run(discover_all(packages, config_files([repository])))
    echo = next(m for m in discovery.models if m.name == "@test/echo")
    assert echo.sequence is not None and echo.sequence.idle_timeout == 5.0
    names = [t["name"] for t in echo.inputs]
    assert "flag" not in names and "text" not in names and "count" in names
    _write(path, '[models."@test/echo".sequence]\nend = "NOPE"\n')
    discovery = asyncio.run(discover_all(packages, config_files([repository])))
    [failure] = discovery.failures
    assert str(path) in failure.error and "end = 'NOPE' names no input" in failure.error
