"""The scheduler's policy against plain LRU, and the idle-timeout trade-off, on real traces.

    python bench/policies.py [--host-memory 1TiB] [--gpus-for-sweep 3]

Three traces of 100 models (written by bench/traces.py, seed 0): Azure's conversation and
code-completion arrivals (bench/data) and a synthetic bursty one. For each, ``omni`` and
``lru`` find the fewest simulated 80 GiB GPUs that start 99 % of requests within 2 s, with the
runtime's defaults (no --config); cold starts per 1,000 requests beside each row. Then, on the
conversation trace at a fixed GPU count, ``idle_timeout`` swept through an omni.toml: cold
starts against the memory idle replicas hold (Serverless in the Wild's trade-off).
Everything runs through ``omni-runtime simulate``'s own code (``plan``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from omni_runtime.scheduler.simulator import parse_options, plan, read_trace

HERE = Path(__file__).resolve().parent


def make_traces(directory: Path) -> dict[str, Path]:
    traces = {
        "Azure conversation": ["azure", str(HERE / "data" / "azure-llm-2023-conv.csv")],
        "Azure code": ["azure", str(HERE / "data" / "azure-llm-2023-code.csv")],
        "synthetic bursty": ["synthetic", "--pattern", "bursty", "--requests", "20000"],
    }
    paths = {}
    for label, args in traces.items():
        path = directory / (label.replace(" ", "-").lower() + ".csv")
        subprocess.run(
            [sys.executable, str(HERE / "traces.py"), *args, "--models", "100", "--seed", "0",
             "-o", str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
        paths[label] = path
    return paths


def row(label: str, policy: str, result: dict[str, object]) -> str:
    p99 = result["p99_wait_seconds"]
    return (
        f"| {label} | {policy} | {result['gpus']} | {float(result['slo_attainment']):.2%} | "  # type: ignore[arg-type]
        f"{'never' if p99 is None else f'{p99:.2f} s'} | {result['cold_starts_per_1000']} | "
        f"{result['evictions']} | {result['wakes']} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host-memory", default="1TiB", help="the simulated node's host memory")
    parser.add_argument("--gpus-for-sweep", type=int, default=3)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="omni-policies-"))
    traces = make_traces(directory)

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    print("| trace | policy | fewest GPUs | SLO attainment | p99 wait | cold starts per 1,000 "
          "| evictions | wakes |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, path in traces.items():
        trace = read_trace(path)
        for policy in ("omni", "lru"):
            options = parse_options(policy=policy, host_memory=args.host_memory)
            result = plan(trace, options, progress, baseline=policy == "omni")
            print(row(label, policy, result), flush=True)

    print()
    print(f"idle_timeout on the Azure conversation trace, {args.gpus_for_sweep} GPUs (omni):")
    print()
    print(
        "| idle_timeout | SLO attainment | p99 wait | cold starts per 1,000 | idle memory (GiB) |"
    )
    print("| --- | --- | --- | --- | --- |")
    trace = read_trace(traces["Azure conversation"])
    names = sorted({r.model for r in trace})
    for timeout in ("30s", "1m", "5m", "30m"):
        config = directory / f"idle-{timeout}.toml"
        config.write_text(
            "".join(f'[models."{n}".scaling]\nidle_timeout = "{timeout}"\n' for n in names)
        )
        options = parse_options(
            gpus=args.gpus_for_sweep, host_memory=args.host_memory, config=config
        )
        result = plan(trace, options, progress, baseline=False)
        p99 = result["p99_wait_seconds"]
        print(
            f"| {timeout} | {result['slo_attainment']:.2%} | "
            f"{'never' if p99 is None else f'{p99:.2f} s'} | {result['cold_starts_per_1000']} | "
            f"{result['idle_memory_gib']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
