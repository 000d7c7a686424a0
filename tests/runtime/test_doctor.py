from __future__ import annotations

from pathlib import Path

from omni_runtime.doctor import cgroup_version, doctor_report


def test_cgroup_version_from_the_hierarchy(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    assert cgroup_version(v2) == "v2"
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    assert cgroup_version(v1) == "v1"
    assert cgroup_version(tmp_path / "none") == "none"


def test_report_covers_what_operators_ask() -> None:
    report = doctor_report()
    assert {"root", "cgroup", "namespaces", "cuda", "sandbox"} <= set(report)
    if report["root"]:  # the launcher really ran, around /bin/true
        assert report["sandbox"].startswith("yes"), report["sandbox"]
