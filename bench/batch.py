"""What a large asynchronous batch costs interactive requests, and what it gets done.

    python bench/batch.py [--items 600] [--interactive 150] [--work 0.02]

One runtime serves @scale/sleepy (a sync engine that works --work seconds per request, up to 4
replicas). Interactive requests are sent one after another, first alone, then while a batch of
--items runs on the same model. Then the batch's throughput against calling the model in a loop
(one at a time, and 4 at a time). Ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "tests" / "fixtures" / "packages" / "scaling-models"
MODEL = "@scale/sleepy"


def serve(state: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(PACKAGE), "--port", "0",
         "--state-dir", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"serving \d+ of \d+ models at (\S+)", line)
        if match:
            return process, match.group(1)
    raise RuntimeError("the runtime did not start")


def interactive(client: httpx.Client, count: int, work: float) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.post(f"/ai/run/{MODEL}", json={"seconds": work})
        response.raise_for_status()
        samples.append(time.perf_counter() - started)
    return sorted(samples)


def pct(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * q))] * 1000


def wait_done(client: httpx.Client, request_id: str) -> None:
    while True:
        result = client.post(f"/ai/run/{MODEL}", json={"request_id": request_id}).json()["result"]
        if "responses" in result:
            assert all(r["success"] for r in result["responses"])
            return
        time.sleep(0.05)


def loop(client: httpx.Client, items: int, work: float, parallel: int) -> float:
    """Seconds to run ``items`` requests, ``parallel`` at a time."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda _: client.post(f"/ai/run/{MODEL}", json={"seconds": work}),
                      range(items)))  # fmt: skip
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--interactive", type=int, default=150)
    parser.add_argument("--work", type=float, default=0.02)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        process, url = serve(Path(state))
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                interactive(client, 10, args.work)  # a replica is up
                alone = interactive(client, args.interactive, args.work)
                body = {"requests": [{"seconds": args.work}] * args.items}
                started = time.perf_counter()
                response = client.post(f"/ai/run/{MODEL}", params={"queueRequest": "true"},
                                       json=body)  # fmt: skip
                request_id = response.json()["result"]["request_id"]
                during = interactive(client, args.interactive, args.work)
                wait_done(client, request_id)
                batch_seconds = time.perf_counter() - started
                looped = loop(client, args.items, args.work, 1)
                looped4 = loop(client, args.items, args.work, 4)
        finally:
            process.terminate()
            process.wait(30)
    print(f"{'interactive /ai/run':<28}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'alone':<28}{pct(alone, 0.5):>9.1f}{pct(alone, 0.99):>9.1f}")
    print(f"{'during a batch':<28}{pct(during, 0.5):>9.1f}{pct(during, 0.99):>9.1f}")
    print(
        f"{'ratio':<28}{pct(during, 0.5) / pct(alone, 0.5):>9.2f}"
        f"{pct(during, 0.99) / pct(alone, 0.99):>9.2f}"
    )
    print(f"\n{'throughput, ' + str(args.items) + ' items':<28}{'seconds':>9}{'items/s':>9}")
    for name, seconds in (
        ("batch (queueRequest)", batch_seconds),
        ("loop, one at a time", looped),
        ("loop, 4 at a time", looped4),
    ):
        print(f"{name:<28}{seconds:>9.2f}{args.items / seconds:>9.1f}")
    print(f"\n(work {args.work * 1000:.0f} ms per request, cpu count {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
