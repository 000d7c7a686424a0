"""The scheduler under a burst, and the scale-to-zero round trip.

    python bench/scaling.py [--clients 16] [--ms 200] [--seconds 12]

A slow sync engine (each request holds a replica for --ms, one at a time; target 1 ongoing
request per replica, at most 8 replicas) starts at zero replicas. --clients closed-loop
clients then send requests for --seconds. Printed:

  1. replicas, queue depth and answers over time, sampled from /metrics;
  2. throughput and latency of the burst, against the same burst on a model held at one
     replica (max_replicas = 1: what a static server does);
  3. the fall back to zero once the traffic stops (idle_timeout 3s, stable window 10s);
  4. the scale-to-zero round trip: a request to a model at zero replicas vs a warm one.
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
PACKAGE = HERE / "packages" / "sleepy"
MODEL = "@bench/sleepy"
READY = re.compile(r"omni-runtime: serving \d+ of \d+ models at (http://\S+)")


def serve(config: str) -> tuple[subprocess.Popen[str], str]:
    path = Path(tempfile.mkdtemp()) / "omni.toml"
    path.write_text(config)
    process = subprocess.Popen(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(PACKAGE), "--port", "0",
         "--config", str(path), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]
            return process, match.group(1)
    raise RuntimeError("omni-runtime did not start")


def gauge(text: str, name: str) -> float:
    match = re.search(rf'^{name}\{{model="{re.escape(MODEL)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def burst(url: str, clients: int, ms: float, seconds: float) -> dict[str, object]:
    """Closed-loop clients for ``seconds``; /metrics sampled every half second meanwhile."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.post(f"/ai/run/{MODEL}", json={"ms": ms})
                with lock:
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    timeline = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while any(t.is_alive() for t in threads):
            text = http.get("/metrics").text
            with lock:
                done = len(latencies)
            timeline.append(
                (
                    time.monotonic() - began,
                    gauge(text, "omni_model_replicas"),
                    gauge(text, "omni_model_queue_depth"),
                    done,
                )
            )
            time.sleep(0.5)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "timeline": timeline,
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def time_to_zero(url: str, timeout: float = 60) -> float:
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() - began < timeout:
            if gauge(http.get("/metrics").text, "omni_model_replicas") == 0:
                return time.monotonic() - began
            time.sleep(0.1)
    return float("nan")


def round_trip(url: str, ms: float, runs: int = 5) -> tuple[float, float]:
    """(cold, warm) median latency in ms of one request: from zero replicas, then warm."""
    cold_samples = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(runs):
            time_to_zero(url)
            time.sleep(1.0)  # let the stopped workers' exits settle
            started = time.perf_counter()
            http.post(f"/ai/run/{MODEL}", json={"ms": ms}).raise_for_status()
            cold_samples.append((time.perf_counter() - started) * 1000)
        warm_samples = []
        for _ in range(20):
            started = time.perf_counter()
            http.post(f"/ai/run/{MODEL}", json={"ms": ms}).raise_for_status()
            warm_samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(cold_samples), statistics.median(warm_samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--ms", type=float, default=200.0, help="engine time per request")
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    elastic_config = (
        '[scheduler]\nstable_window = "10s"\npanic_window = "2s"\n'
        f'[models."{MODEL}".scaling]\nidle_timeout = "3s"\n'
    )
    static_config = f'[models."{MODEL}".scaling]\nmin_replicas = 1\nmax_replicas = 1\n'

    process, url = serve(elastic_config)
    try:
        elastic = burst(url, args.clients, args.ms, args.seconds)
        to_zero = time_to_zero(url)
        cold, warm = round_trip(url, 0)
    finally:
        process.terminate()
        process.wait(30)
    process, url = serve(static_config)
    try:
        static = burst(url, args.clients, args.ms, args.seconds)
    finally:
        process.terminate()
        process.wait(30)

    print(f"burst: {args.clients} clients, {args.ms:.0f} ms per request, {args.seconds:.0f}s")
    print(f"{'t (s)':>6} {'replicas':>9} {'queued':>7} {'answered':>9}")
    for t, replicas, queued, done in elastic["timeline"]:  # type: ignore[attr-defined]
        print(f"{t:6.1f} {replicas:9.0f} {queued:7.0f} {done:9d}")
    print()
    print(f"{'deployment':<28} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label, result in (("elastic (0..8 replicas)", elastic), ("static (1 replica)", static)):
        print(
            f"{label:<28} {result['rps']:7.1f} {result['p50']:8.0f} {result['p99']:8.0f} "
            f"{result['errors']:7d}"
        )
    print()
    print(f"back to zero replicas {to_zero:.1f}s after the burst ended (idle_timeout 3s)")
    print(
        f"scale-to-zero round trip: first request {cold:.0f} ms (median of 5), "
        f"warm {warm:.1f} ms (median of 20)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
