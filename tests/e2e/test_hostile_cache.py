"""A model that fills its cache directory: with ``[server] cache_quota`` it fills its own
filesystem, never the disk that holds the runtime's state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("mkfs.ext4"),
    reason="a quota is a loop-mounted ext4 filesystem: root, loop devices and mkfs.ext4",
)


def test_a_model_cannot_write_past_its_cache_quota(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text('[server]\ncache_quota = "16MiB"\n')
    state = tmp_path / "state"
    with (
        serve(
            FIXTURES / "packages" / "echo-models",
            extra=["--config", str(config), "--state-dir", str(state)],
        ) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        first = http.post("/ai/run/@test/files", json={"path": "/tmp/x", "write": "x"})
        assert first.status_code == 200, first.text
        [cache] = [p for p in (state / "cache").glob("test-files-*") if p.is_dir()]
        assert os.path.ismount(cache)
        small = http.post("/ai/run/@test/files", json={"path": f"{cache}/small", "write": "y"})
        assert small.status_code == 200, small.text
        big = http.post(
            "/ai/run/@test/files", json={"path": f"{cache}/big", "write": "z" * (24 << 20)}
        )
        assert big.status_code == 500
        assert "No space left on device" in big.text
        assert (cache / "big").stat().st_size <= 16 << 20
        runtime.stop()
    assert not os.path.ismount(cache)  # unmounted when the runtime stopped
