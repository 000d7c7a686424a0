"""Models back from zero replicas, fresh and pre-warmed, and what each extra replica costs.

    python bench/cold_start.py [--runs 5] [--models trivial,plain,torch,onnx] [--no-memory]

Back from zero: the first request after a model's last replica stopped (idle_timeout 1s), timed
by a keep-alive HTTP client, so the whole cold start as a client sees it; the median of --runs.
Each model is served with full isolation as the machine allows, once with pre-warming off
(prewarm_timeout = 0: a fresh worker) and once with it on (a worker forked from a pre-warmed
process). The models: bench/packages/trivial (its load does nothing) and the three MiniLM
examples (sentence-transformers, TorchEngine, OnnxEngine). The reference row is a fresh
interpreter importing omni_sdk.

Memory: each MiniLM example scaled from 1 to 4 replicas by load (target_ongoing_requests 1),
pre-warmed and fresh. A model's memory is the proportional set size (PSS) summed over every
process of its user (its workers and its pre-warmed process): pages shared between them, the
mapped weights and what a fork shares, are counted once. "per extra replica" is
(memory at 4 - memory at 1) / 3, against a lone fresh replica's memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
READY = re.compile(r"omni-runtime: serving \d+ of \d+ models at (http://\S+)")


@dataclass(frozen=True)
class Model:
    key: str
    name: str
    package: Path
    body: dict[str, object]


MODELS = {
    m.key: m
    for m in (
        Model("trivial", "@bench/trivial", HERE / "packages" / "trivial", {"text": "hello"}),
        Model(
            "plain",
            "@cf/sentence-transformers/all-minilm-l6-v2",
            ROOT / "examples" / "embeddings-minilm",
            {"text": ["hello world"]},
        ),
        Model(
            "torch",
            "@cf/sentence-transformers/all-minilm-l6-v2-torch",
            ROOT / "examples" / "embeddings-minilm-torch",
            {"text": ["hello world"]},
        ),
        Model(
            "onnx",
            "@cf/sentence-transformers/all-minilm-l6-v2-onnx",
            ROOT / "examples" / "embeddings-minilm-onnx",
            {"text": ["hello world"]},
        ),
    )
}


class Runtime:
    """``omni-runtime serve`` of some packages with a configuration, its output kept."""

    def __init__(self, models: list[Model], config: str) -> None:
        path = Path(tempfile.mkdtemp()) / "omni.toml"
        path.write_text(config)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_runtime.cli", "serve",
             *(str(m.package) for m in models), "--port", "0", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        url = None
        for line in self.process.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                url = match.group(1)
                break
        if url is None:
            raise RuntimeError("omni-runtime did not start:\n" + "".join(self.lines[-20:]))
        self.url = url
        stdout = self.process.stdout
        threading.Thread(target=lambda: self.lines.extend(stdout), daemon=True).start()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def gauge(http: httpx.Client, metric: str, model: str) -> float:
    """The gauge ``metric`` of ``model``, summed over its versions."""
    pattern = rf'^{metric}\{{model="{re.escape(model)}",[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, http.get("/metrics").text, re.M))


def import_seconds(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import omni_sdk"], check=True)
        samples.append(time.perf_counter() - started)
    return samples


def back_from_zero(models: list[Model], prewarm: bool, runs: int) -> dict[str, list[float]]:
    config = (
        '[scheduler]\nstable_window = "2s"\npanic_window = "1s"\n'
        f"prewarm_timeout = {3600 if prewarm else 0}\n"
    ) + "".join(f'[models."{m.name}".scaling]\nidle_timeout = "1s"\n' for m in models)
    runtime = Runtime(models, config)
    samples: dict[str, list[float]] = {}
    try:
        with httpx.Client(base_url=runtime.url, timeout=120) as http:
            for model in models:
                path = f"/ai/run/{model.name}"
                http.post(path, json=model.body).raise_for_status()  # its first start ever
                # The pre-warmed process preloads after the first start: give it time.
                time.sleep(20 if prewarm and model.key != "trivial" else 2)
                for _ in range(runs):
                    deadline = time.monotonic() + 60
                    while gauge(http, "omni_model_replicas", model.name):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{model.name} did not scale to zero")
                        time.sleep(0.1)
                    time.sleep(0.5)  # let the stopped worker's exit settle
                    started = time.perf_counter()
                    http.post(path, json=model.body).raise_for_status()
                    samples.setdefault(model.key, []).append(time.perf_counter() - started)
    finally:
        runtime.close()
    for line in runtime.lines:
        if "not pre-warmed" in line or "will not fork" in line:
            print("  " + line.rstrip(), file=sys.stderr)
    return samples


def pss_of_user(uid: int) -> tuple[int, int]:
    """Bytes of proportional set size over every process of ``uid``, and how many there are."""
    total = count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            owner = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            if owner != uid:
                continue
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
        except (OSError, AttributeError):
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        if match:
            total += int(match.group(1)) * 1024
            count += 1
    return total, count


def worker_uid(model: Model) -> int:
    """The user the model's workers run as (not the root of the sandbox launcher that starts
    them, whose command line names the worker's too)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"omni_sdk.worker" not in command or model.name.encode() not in command:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        found.append(int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)))  # type: ignore[union-attr]
    if not found:
        raise RuntimeError(f"no worker of {model.name} found")
    return max(found)  # a model's own user where there is one, else ours


def settled_pss(uid: int, processes: int) -> int:
    """PSS once ``processes`` processes of ``uid`` exist and the figure stops moving."""
    deadline = time.monotonic() + 90
    last, steady = -1, 0
    while time.monotonic() < deadline:
        total, count = pss_of_user(uid)
        steady = steady + 1 if count >= processes and abs(total - last) < (2 << 20) else 0
        if steady >= 3:  # three seconds without moving: a pre-warmed process has preloaded
            return total
        last = total
        time.sleep(1.0)
    return pss_of_user(uid)[0]


def scale_up(model: Model, prewarm: bool) -> tuple[int, int, int]:
    """PSS of the model's processes at 1 replica and at 4, and how many processes at 4."""
    config = (
        '[scheduler]\nstable_window = "4s"\npanic_window = "1s"\n'
        f"prewarm_timeout = {3600 if prewarm else 0}\n"
        f'[models."{model.name}".scaling]\nidle_timeout = "5m"\nmax_replicas = 4\n'
        "target_ongoing_requests = 1\n"
    )
    runtime = Runtime([model], config)
    path = f"/ai/run/{model.name}"
    try:
        with httpx.Client(base_url=runtime.url, timeout=120) as http:
            http.post(path, json=model.body).raise_for_status()
            uid = worker_uid(model)
            if prewarm:  # the pre-warmed process preloads after the first start
                deadline = time.monotonic() + 60
                while not any("pre-warmed process for" in line for line in runtime.lines):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            one = settled_pss(uid, 1)
            stop = threading.Event()

            def load() -> None:
                with httpx.Client(base_url=runtime.url, timeout=120) as client:
                    while not stop.is_set():
                        client.post(path, json=model.body)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for _ in range(8):
                    pool.submit(load)
                deadline = time.monotonic() + 180
                ready = f"model '{model.name}' ready: replica"
                while sum(ready in line for line in runtime.lines) < 4:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{model.name} did not reach 4 ready replicas")
                    time.sleep(0.5)
                # Measured under the load that holds the 4 replicas (without it the autoscaler
                # scales down after the stable window).
                time.sleep(2)
                four = settled_pss(uid, 4)
                replicas = gauge(http, "omni_model_replicas", model.name)
                stop.set()
            if replicas < 4:
                raise RuntimeError(f"{model.name} had {replicas:.0f} replicas when measured")
            return one, four, pss_of_user(uid)[1]
    finally:
        runtime.close()


def latency(models: list[Model], runs: int) -> None:
    imported = statistics.median(import_seconds(runs))
    print(f"  (back from zero: {len(models)} models, fresh workers)", file=sys.stderr)
    fresh = back_from_zero(models, False, runs)
    print(f"  (back from zero: {len(models)} models, pre-warmed)", file=sys.stderr)
    warm = back_from_zero(models, True, runs)
    print(f'python -c "import omni_sdk": {imported * 1000:.0f} ms\n')
    print(
        f"{'model':10} {'fresh ms':>10} {'pre-warmed ms':>14} {'pre-warmed/fresh':>17}"
        f" {'/import':>8}"
    )
    for model in models:
        f, w = statistics.median(fresh[model.key]), statistics.median(warm[model.key])
        print(f"{model.key:10} {f * 1000:10.0f} {w * 1000:14.0f} {w / f:17.2f} {w / imported:8.2f}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="trivial,plain,torch,onnx")
    parser.add_argument("--no-memory", action="store_true", help="skip the scale-up rows")
    parser.add_argument("--no-latency", action="store_true", help="skip back from zero")
    args = parser.parse_args()
    models = [MODELS[key] for key in args.models.split(",")]
    if not args.no_latency:
        latency(models, args.runs)
    if args.no_memory:
        return 0
    print()
    print(f"{'model':10} {'1 fresh MiB':>12} {'start':>11} {'1 replica':>10} {'4 replicas':>11}"
          f" {'per extra':>10} {'vs 1 fresh':>11}")  # fmt: skip
    for model in models:
        if model.key == "trivial":
            continue
        print(f"  (scaling {model.name} from 1 to 4 replicas)", file=sys.stderr)
        lone = 0
        for prewarm in (False, True):
            one, four, _ = scale_up(model, prewarm)
            lone = lone or one  # the fresh run's first replica, alone
            extra = (four - one) / 3
            print(
                f"{model.key:10} {lone / 2**20:12.0f} {'pre-warmed' if prewarm else 'fresh':>11}"
                f" {one / 2**20:10.0f} {four / 2**20:11.0f} {extra / 2**20:10.0f}"
                f" {extra / lone:10.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
