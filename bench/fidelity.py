"""Does ``omni-runtime simulate`` predict what the live runtime does? A replay on this machine.

    python bench/fidelity.py [--models 6] [--seconds 150] [--host-memory 800MB] [--slo 1s,2s]

N small sleep-based models (each one's ``load()`` really allocates its memory; a request
sleeps for the duration the trace gives and says when it started) are served by a real
``omni-runtime serve`` under a host budget smaller than their sum, with the same omni.toml
that ``simulate --config`` then reads. Steps:

  1. calibrate: one runtime starts each model once; each model's measured memory becomes the
     trace's ``memory`` column;
  2. for each trace (one Zipf-steady, one bursty; seeded), a fresh runtime replays it at the
     trace's times; each request's wait is its start (reported by the model) less its arrival;
     cold starts, evictions and the mean start (spawn to ready) come from ``/metrics``;
  3. ``omni-runtime simulate TRACE --gpus 0 --config omni.toml --start-seconds S --json``
     on the same trace, S being that replay's mean start;

and prints both side by side. Target: SLO attainment within 2 percentage points, cold starts
and evictions within 20 % (or 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

READY = re.compile(r"omni-runtime: serving \d+ of \d+ models at (http://\S+)")
MB = 1_000_000

PACKAGE = '''
"""Sleep-based models for bench/fidelity.py: load() holds real memory, infer() sleeps."""

import json
import time
from pathlib import Path

from pydantic import BaseModel

from omni_sdk import Engine, hookimpl

MODELS = json.loads((Path(__file__).parent / "models.json").read_text())


class Work(BaseModel):
    seconds: float


class Started(BaseModel):
    started: float


def engine(name: str, memory: int) -> type[Engine]:
    class Holder(Engine):
        def load(self, ctx) -> None:
            self.held = b"\\x01" * memory  # every page written: resident, not just reserved

        def infer(self, request: Work) -> Started:
            started = time.time()
            time.sleep(request.seconds)
            return Started(started=started)

    Holder.name = name
    Holder.__name__ = Holder.__qualname__ = "Holder_" + name.rsplit("/", 1)[-1]
    return Holder


@hookimpl
def register_engines(register):
    for name, memory in MODELS.items():
        register(engine(name, memory))
'''


def write_package(root: Path, models: dict[str, int]) -> Path:
    package = root / "fidelity-models"
    package.mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        '[project]\nname = "omni-bench-fidelity"\nversion = "0.1.0"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\n'
        'fidelity = "omni_bench_fidelity"\n'
    )
    (package / "omni_bench_fidelity.py").write_text(PACKAGE)
    (package / "models.json").write_text(json.dumps(models))
    for path in (root, package, *package.iterdir()):  # models run as users of their own
        path.chmod(0o755 if path.is_dir() else 0o644)
    return package


def write_config(path: Path, models: dict[str, int], declared: int, host: str) -> None:
    lines = [
        "[scheduler]",
        f'host_memory = "{host}"',
        "prewarm_timeout = 0  # every start is a fresh worker, as the simulator assumes",
        'stable_window = "20s"',
        'panic_window = "4s"',
        "",
    ]
    for name in models:
        lines += [
            f'[models."{name}".resources]',
            f"memory = {declared}",
            f'[models."{name}".scaling]',
            'idle_timeout = "15s"',
            "max_replicas = 2",
            "",
        ]
    path.write_text("\n".join(lines))
    path.chmod(0o644)


class Runtime:
    def __init__(self, package: Path, config: Path, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_runtime.cli", "serve", str(package), "--port", "0",
             "--config", str(config), "--shared-env", "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.url = ""
        for line in self.process.stdout:
            self.log.write(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            raise RuntimeError("omni-runtime did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.write(line)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def total(text: str, name: str, **labels: str) -> float:
    value = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, number = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            value += float(number)
    return value


# -- traces ------------------------------------------------------------------------------


def zipf_choice(rng: random.Random, names: list[str], s: float = 1.0) -> str:
    weights = [1 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights)[0]


def steady_trace(names: list[str], seconds: float, rate: float, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    t, rows = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return rows
        rows.append((round(t, 4), zipf_choice(rng, names), round(rng.uniform(0.05, 0.3), 4)))


def bursty_trace(names: list[str], seconds: float, rate: float, seed: int) -> list[tuple]:
    """A Zipf background, and every 40 s an 8 s burst at 4x the rate on one random model."""
    rng = random.Random(seed)
    rows = steady_trace(names, seconds, rate, seed)
    start = 10.0
    while start < seconds - 8:
        model = rng.choice(names)
        t = start
        while t < start + 8:
            t += rng.expovariate(4 * rate)
            rows.append((round(t, 4), model, round(rng.uniform(0.05, 0.3), 4)))
        start += 40.0
    return sorted(rows)


def write_trace(path: Path, rows: list[tuple], memory: dict[str, int]) -> None:
    lines = ["time,model,duration,memory"]
    lines += [f"{t},{m},{d},{memory[m]}" for t, m, d in rows]
    path.write_text("\n".join(lines) + "\n")


# -- live --------------------------------------------------------------------------------


def calibrate(package: Path, config: Path, names: list[str]) -> tuple[float, dict[str, int]]:
    """Each model started once: the mean start in seconds, and each one's measured memory."""
    runtime = Runtime(package, config, config.parent / "calibration.log")
    try:
        memory = {}
        with httpx.Client(base_url=runtime.url, timeout=120) as http:
            for name in names:
                http.post(f"/ai/run/{name}", json={"seconds": 0.01}).raise_for_status()
                time.sleep(1.2)  # a measurement
                text = runtime.metrics()
                memory[name] = int(total(text, "omni_model_memory_bytes", model=name, kind="host"))
        text = runtime.metrics()
        count = total(text, "omni_model_load_duration_seconds_count")
        seconds = total(text, "omni_model_load_duration_seconds_sum") / max(1, count)
        return seconds, memory
    finally:
        runtime.stop()


async def replay(url: str, rows: list[tuple]) -> list[float]:
    waits = [math.inf] * len(rows)
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        # One warm connection per expected concurrent request, so none pays a connect.
        start = time.time() + 1.0
        base = loop.time() + 1.0

        async def one(index: int, at: float, model: str, seconds: float) -> None:
            await asyncio.sleep(max(0.0, base + at - loop.time()))
            response = await http.post(f"/ai/run/{model}", json={"seconds": seconds})
            if response.status_code == 200:
                waits[index] = response.json()["result"]["started"] - (start + at)

        await asyncio.gather(*(one(i, t, m, d) for i, (t, m, d) in enumerate(rows)))
    return waits


def live(package: Path, config: Path, rows: list[tuple], log: Path) -> dict[str, float]:
    runtime = Runtime(package, config, log)
    try:
        waits = asyncio.run(replay(runtime.url, rows))
        text = runtime.metrics()
    finally:
        runtime.stop()
    starts = total(text, "omni_model_load_duration_seconds_count")
    return {
        "waits": waits,  # type: ignore[dict-item]
        "cold_starts": total(text, "omni_model_cold_starts_total"),
        "evictions": total(text, "omni_model_evictions_total", reason="memory"),
        # What a start cost during this replay (the machine is busier than when calibrating).
        "start": total(text, "omni_model_load_duration_seconds_sum") / max(1, starts),
    }


def simulated(trace: Path, config: Path, start: float, slo: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "omni_runtime.cli", "simulate", str(trace), "--gpus", "0",
         "--config", str(config), "--start-seconds", f"{start:.4f}", "--slo", slo, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def summary(waits: list[float], slo: float) -> tuple[float, float]:
    met = sum(1 for w in waits if w <= slo) / len(waits)
    ordered = sorted(waits)
    return met, ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def close(live_value: float, sim_value: float) -> bool:
    return abs(live_value - sim_value) <= max(3, 0.2 * max(live_value, sim_value))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=150.0, help="length of each trace")
    parser.add_argument("--rate", type=float, default=2.0, help="mean requests per second")
    parser.add_argument("--allocate", type=int, default=120, help="MB each model's load holds")
    parser.add_argument("--declared", type=int, default=200, help="MB each model declares")
    parser.add_argument("--host-memory", default="800MB", help="the node's budget")
    parser.add_argument("--slo", default="1s,2s", help="one or more, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    slos = [s.strip() for s in args.slo.split(",")]

    root = Path(tempfile.mkdtemp(prefix="omni-fidelity-"))
    root.chmod(0o755)
    names = [f"@fidelity/m{i}" for i in range(args.models)]
    package = write_package(root / "repo", {n: args.allocate * MB for n in names})
    config = root / "omni.toml"
    write_config(config, dict.fromkeys(names, 0), args.declared * MB, args.host_memory)
    print(
        f"{args.models} models, each holding {args.allocate} MB (declared {args.declared} MB), "
        f"host budget {args.host_memory}, SLO {' and '.join(slos)}; files in {root}",
        flush=True,
    )
    start, memory = calibrate(package, config, names)
    print(
        f"calibrated: a start takes {start:.3f}s; measured memory per model "
        f"{min(memory.values()) / MB:.0f}-{max(memory.values()) / MB:.0f} MB",
        flush=True,
    )
    traces = {
        "steady (Zipf)": steady_trace(names, args.seconds, args.rate, args.seed),
        "bursty": bursty_trace(names, args.seconds, args.rate, args.seed + 1),
    }
    results = []
    for label, rows in traces.items():
        path = root / f"{label.split()[0]}.csv"
        write_trace(path, rows, memory)
        print(f"replaying {label}: {len(rows)} requests over {args.seconds:.0f}s ...", flush=True)
        real = live(package, config, rows, path.with_suffix(".log"))
        print(f"  a start took {real['start']:.3f}s on average while it replayed", flush=True)
        for slo in slos:
            sim = simulated(path, config, real["start"], slo)
            met, p99 = summary(real["waits"], float(slo.rstrip("s")))  # type: ignore[arg-type]
            results.append((f"{label}, SLO {slo}", len(rows), met, p99, real, sim))

    print()
    print(
        f"{'trace':<22} {'':<10} {'SLO met':>8} {'p99 wait':>9} {'cold starts':>12} "
        f"{'evictions':>10}"
    )
    ok = True
    for label, _count, met, p99, real, sim in results:
        sim_p99 = sim["p99_wait_seconds"]
        print(
            f"{label:<22} {'live':<10} {met:>8.2%} {p99:>8.3f}s {real['cold_starts']:>12.0f} "
            f"{real['evictions']:>10.0f}"
        )
        print(
            f"{'':<22} {'simulated':<10} {sim['slo_attainment']:>8.2%} "
            f"{(sim_p99 if sim_p99 is not None else math.inf):>8.3f}s "
            f"{sim['cold_starts']:>12} {sim['evictions']:>10}"
        )
        checks = {
            "SLO within 2 points": abs(met - sim["slo_attainment"]) <= 0.02,
            "cold starts within 20% (or 3)": close(real["cold_starts"], sim["cold_starts"]),
            "evictions within 20% (or 3)": close(real["evictions"], sim["evictions"]),
        }
        ok = ok and all(checks.values())
        verdict = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
        print(f"{'':<22} {verdict}")
    print(f"\nfidelity target {'met' if ok else 'NOT met'} (pid {os.getpid()})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
