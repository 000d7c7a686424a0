"""Cold start of a small model: building its environment, and starting its worker from cache.

    python bench/env_build.py [--runs 5]

Rows (median and best of --runs):
  env build, warm uv cache   a new environment for a package that pins six==1.16.0 (one small
                             download the first time, then uv's cache)
  env build, nothing extra   a new environment for a package the base layer satisfies
  env reuse                  the same package again: hash check, no install step
  worker start               spawn `python -m omni_sdk.worker` in the cached env, import, load,
                             HELLO; with the cgroup and mount namespace the machine allows
  first response             the first /ai/run-style request after HELLO
  cold start total           env reuse + worker start + first response
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omni_runtime.config import ServerSettings
from omni_runtime.discovery import discover_all
from omni_runtime.isolation import Isolation
from omni_runtime.isolation.environments import EnvironmentBuilder
from omni_runtime.workers import WorkerProcess
from omni_sdk.wire import Kind

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "tests" / "fixtures" / "conflicts" / "six-old"
PLAIN = REPO / "tests" / "fixtures" / "packages" / "echo-models"


async def measure(runs: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {
        "env build, warm uv cache": [],
        "env build, nothing extra": [],
        "env reuse": [],
        "worker start": [],
        "first response": [],
        "cold start total": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="omni-bench-"))
    try:
        for run in range(runs):
            builder = EnvironmentBuilder(scratch / f"envs-{run}")
            started = time.perf_counter()
            await builder.ensure(PINNED)
            rows["env build, warm uv cache"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await builder.ensure(PLAIN)
            rows["env build, nothing extra"].append(time.perf_counter() - started)

        builder = EnvironmentBuilder(scratch / "envs-0")
        discovery = await discover_all([PLAIN], {}, builder)
        spec = next(m for m in discovery.models if m.name == "@test/echo")
        isolation = Isolation.detect([PLAIN], state_dir=scratch)
        settings = ServerSettings()
        for _ in range(runs):
            started = time.perf_counter()
            await builder.ensure(PLAIN)
            reused = time.perf_counter() - started
            worker = WorkerProcess(spec, settings, isolation)
            started = time.perf_counter()
            await worker.start()
            spawned = time.perf_counter() - started
            assert worker.channel is not None
            started = time.perf_counter()
            status, _, _ = await worker.channel.request(Kind.RUN_JSON, [b'{"text": "hi"}'])
            answered = time.perf_counter() - started
            assert status == 200
            await worker.stop(timeout=10)
            rows["env reuse"].append(reused)
            rows["worker start"].append(spawned)
            rows["first response"].append(answered)
            rows["cold start total"].append(reused + spawned + answered)
        isolation.close()
        print(f"isolation: {isolation.description}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.runs))
    print(f"{'step':<28}{'median ms':>12}{'best ms':>10}")
    for name, samples in rows.items():
        print(f"{name:<28}{statistics.median(samples) * 1000:>12.1f}{min(samples) * 1000:>10.1f}")
    print(f"({args.runs} runs, python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
