"""The pure parts of the worker's sandbox; tests/e2e/test_sandbox.py checks the mounts."""

from __future__ import annotations

from omni_sdk._sandbox import SandboxSpec, _outermost, meminfo_text

HOST = """MemTotal:       24000000 kB
MemFree:        20000000 kB
MemAvailable:   22000000 kB
Buffers:          100000 kB
SwapTotal:       1000000 kB
SwapFree:        1000000 kB
"""


def test_meminfo_is_capped_at_the_limit() -> None:
    text = meminfo_text(300 << 20, HOST)
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()}
    assert values["MemTotal"] == values["MemFree"] == values["MemAvailable"] == 300 * 1024
    assert values["SwapTotal"] == values["SwapFree"] == 0
    assert values["Buffers"] == 100000  # the rest is the host's
    assert meminfo_text(64 << 30, HOST).startswith("MemTotal:       24000000 kB")


def test_only_outermost_directories_are_rebound() -> None:
    paths = ["/tmp/co/.venv/lib/site-packages", "/tmp/co", "/tmp/co/runtime", "/tmp/other"]
    assert _outermost(paths) == ["/tmp/co", "/tmp/other"]


def test_spec_round_trips_as_json() -> None:
    spec = SandboxSpec("/pkg", hide=["/other"], memory_limit=1 << 30, keep=["/env"])
    assert SandboxSpec.from_json(spec.to_json()) == spec
