"""A model back from zero replicas, against a fresh interpreter importing omni_sdk.

    python bench/cold_start.py [--runs 7]

Rows, each the median of --runs:
  python -c "import omni_sdk"       a fresh interpreter of the runtime's environment
  back from zero, fresh worker      omni-runtime with pre-warming off (prewarm_timeout = 0)
  back from zero, pre-warmed        the same with a pre-warmed process forking the worker
The model is bench/packages/trivial (its load does nothing), served with full isolation as the
machine allows; "back from zero" is the first request after its last replica stopped
(idle_timeout 1s), timed by a keep-alive HTTP client: the whole cold start as a client sees it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "packages" / "trivial"
MODEL = "@bench/trivial"
READY = re.compile(r"omni-runtime: serving \d+ of \d+ models at (http://\S+)")


def import_seconds(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import omni_sdk"], check=True)
        samples.append(time.perf_counter() - started)
    return samples


def replicas(http: httpx.Client) -> float:
    match = re.search(
        rf'^omni_model_replicas\{{model="{re.escape(MODEL)}"\}} (\S+)$',
        http.get("/metrics").text,
        re.M,
    )
    return float(match.group(1)) if match else 0.0


def round_trips(prewarm: bool, runs: int) -> tuple[list[float], list[str]]:
    config = Path(tempfile.mkdtemp()) / "omni.toml"
    config.write_text(
        '[scheduler]\nstable_window = "2s"\npanic_window = "1s"\n'
        f"prewarm_timeout = {3600 if prewarm else 0}\n"
        f'[models."{MODEL}".scaling]\nidle_timeout = "1s"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(PACKAGE), "--port", "0",
         "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    url = None
    for line in process.stdout:
        match = READY.search(line)
        if match:
            url = match.group(1)
            break
    if url is None:
        raise RuntimeError("omni-runtime did not start")
    stdout = process.stdout
    threading.Thread(target=lambda: lines.extend(stdout), daemon=True).start()
    samples = []
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            http.post(f"/ai/run/{MODEL}", json={"text": "warm-up"}).raise_for_status()
            for _ in range(runs):
                deadline = time.monotonic() + 30
                while replicas(http) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)  # let the stopped worker's exit settle
                started = time.perf_counter()
                http.post(f"/ai/run/{MODEL}", json={"text": "hello"}).raise_for_status()
                samples.append(time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(30)
    phases = [
        line.split("omni.scheduler: ", 1)[-1].rstrip() for line in lines if "cold start of" in line
    ]
    return samples, phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    imported = statistics.median(import_seconds(args.runs))
    fresh, fresh_phases = round_trips(False, args.runs)
    warm, warm_phases = round_trips(True, args.runs)
    rows = [
        ('python -c "import omni_sdk"', imported),
        ("back from zero, fresh worker", statistics.median(fresh)),
        ("back from zero, pre-warmed", statistics.median(warm)),
    ]
    print(f"{'':34} {'median ms':>10} {'vs import':>10}")
    for label, seconds in rows:
        print(f"{label:34} {seconds * 1000:10.1f} {seconds / imported:9.2f}x")
    print()
    print("last cold start, fresh:      " + (fresh_phases[-1] if fresh_phases else "-"))
    print("last cold start, pre-warmed: " + (warm_phases[-1] if warm_phases else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
