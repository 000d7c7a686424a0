"""Two models that pin conflicting versions of one library, served side by side."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import FIXTURES
from tests.e2e.runtime import serve

CONFLICTS = FIXTURES / "conflicts"


def test_conflicting_versions_side_by_side(tmp_path: Path) -> None:
    with (
        serve(CONFLICTS, extra=["--state-dir", str(tmp_path / "state")]) as runtime,
        httpx.Client(base_url=runtime.url, timeout=60) as http,
    ):
        old = http.post("/ai/run/@test/six-old", json={}).json()["result"]
        new = http.post("/ai/run/@test/six-new", json={}).json()["result"]
        assert old["six"] == "1.16.0"
        assert new["six"] == "1.17.0"
        assert old["path"] != new["path"]
        index = {e["name"]: e for e in http.post("/v2/repository/index", json={}).json()}
        assert index["unresolvable"]["state"] == "UNAVAILABLE"
        assert "six==0.0.1" in index["unresolvable"]["reason"]
