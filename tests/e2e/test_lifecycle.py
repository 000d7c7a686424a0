"""Start-up problems and a clean, draining shutdown."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.runtime import serve


def test_sigterm_drains_in_flight_requests(echo_package: Path) -> None:
    with serve(echo_package) as runtime, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pid = httpx.post(f"{runtime.url}/ai/run/@test/echo", json={"text": "x"}).json()["result"][
            "pid"
        ]
        mark = len(runtime.lines)
        slow = pool.submit(
            httpx.post, f"{runtime.url}/ai/run/@test/slow", json={"seconds": 1.0}, timeout=30
        )
        runtime.wait_for_line("slow request started", start=mark)
        assert runtime.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        response = slow.result()
        assert response.status_code == 200
        assert response.json()["result"]["text"] == "done"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"worker {pid} outlived the runtime")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    result = _cli("serve", str(tmp_path / "nowhere"), "--port", "0")
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in result.stderr
    result = _cli("serve", str(tmp_path), "--port", "0")
    assert result.returncode == 2
    assert "holds no model package" in result.stderr


def test_bad_config_names_file_and_field(echo_package: Path, tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text('[models."@test/echo".resources]\nmemory = "lots"\n')
    result = _cli("serve", str(echo_package), "--port", "0", "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "resources.memory" in result.stderr
    assert "expected a size such as '2GiB'" in result.stderr


def test_models_command_lists_engines(echo_package: Path) -> None:
    result = _cli("models", str(echo_package), "--json")
    assert result.returncode == 0, result.stderr
    import json

    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["@test/echo"]["task"] == "text-generation"
    assert models["@test/gate"]["scaling"]["target_ongoing_requests"] == 1
    table = _cli("models", str(echo_package)).stdout
    assert "@test/echo" in table and "text:BYTES[1]" in table
