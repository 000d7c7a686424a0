"""Request traces for `omni-runtime simulate`: Azure's arrivals or synthetic ones, on many models.

    python bench/traces.py azure bench/data/azure-llm-2023-conv.csv --models 100 -o conv.csv
    python bench/traces.py synthetic --pattern diurnal --models 100 --requests 20000 -o syn.csv

Both write the simulator's columns: time, model, duration, memory.

- **Models**: `--models` names `@trace/model-000`...; each gets a footprint drawn once (seeded)
  from a catalogue like Workers AI's: 1 GiB (embeddings, classifiers) 20 %, 2 GiB 20 %, 4 GiB
  25 %, 8 GiB 25 % (small LLMs), 16 GiB 10 % (7-8B LLMs in 16 bits).
- **Popularity**: a request's model is a seeded Zipf choice (rank r with weight 1/r^s,
  `--zipf` s = 1.0), ranks assigned to models in a seeded random order, so popularity and size
  are independent.
- **azure**: arrivals are the trace's own timestamps (seconds from its first request); a
  request's duration on the GPU is its prefill and decode time, ContextTokens / 10,000 tok/s +
  GeneratedTokens x 20 ms.
- **synthetic**: `--requests` arrivals over `--hours`: `uniform` (Poisson), `diurnal` (the rate
  follows one sinusoidal day, from 0.2x to 1.8x the mean), or `bursty` (Poisson with a 10x burst
  of 30 s every 5 minutes); durations log-normal around `--duration` seconds.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from datetime import datetime
from pathlib import Path

CATALOGUE = [(1, 0.20), (2, 0.20), (4, 0.25), (8, 0.25), (16, 0.10)]  # GiB, share
PREFILL_TOKENS_PER_SECOND = 10_000
DECODE_SECONDS_PER_TOKEN = 0.020


def model_names(count: int) -> list[str]:
    return [f"@trace/model-{i:03d}" for i in range(count)]


def footprints(names: list[str], rng: random.Random) -> dict[str, str]:
    sizes, weights = zip(*CATALOGUE, strict=True)
    return {name: f"{rng.choices(sizes, weights)[0]}GiB" for name in names}


class Population:
    """The models of a trace: their footprints and a seeded Zipf choice among them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        names = model_names(args.models)
        self.memory = footprints(names, self.rng)
        self.ranked = list(names)  # popularity ranks, independent of size
        self.rng.shuffle(self.ranked)
        self.weights = [1.0 / (rank**args.zipf) for rank in range(1, len(names) + 1)]

    def choose(self) -> str:
        return self.rng.choices(self.ranked, self.weights)[0]


def azure(args: argparse.Namespace) -> list[tuple[float, str, float, str]]:
    models = Population(args)
    rows = []
    start = None
    with open(args.source, newline="") as f:
        for record in csv.DictReader(f):
            stamp = datetime.fromisoformat(record["TIMESTAMP"][:26])
            start = start or stamp
            context, generated = int(record["ContextTokens"]), int(record["GeneratedTokens"])
            duration = context / PREFILL_TOKENS_PER_SECOND + generated * DECODE_SECONDS_PER_TOKEN
            model = models.choose()
            rows.append(((stamp - start).total_seconds(), model, max(duration, 0.001)))
    return [(t, m, d, models.memory[m]) for t, m, d in rows]


def synthetic(args: argparse.Namespace) -> list[tuple[float, str, float, str]]:
    models = Population(args)
    rng = models.rng
    span = args.hours * 3600
    mean_rate = args.requests / span

    def rate(t: float) -> float:
        if args.pattern == "diurnal":
            return mean_rate * (1 + 0.8 * math.sin(2 * math.pi * t / span))
        if args.pattern == "bursty":
            base = mean_rate / (1 + 9 * 30 / 300)  # the bursts keep the mean
            return base * (10 if t % 300 < 30 else 1)
        return mean_rate

    peak = max(rate(t) for t in range(0, int(span) + 1, 10)) * 1.01
    rows = []
    t = 0.0
    while len(rows) < args.requests:  # thinning: Poisson at the peak, kept at rate(t)/peak
        t += rng.expovariate(peak)
        if t >= span:
            t -= span
        if rng.random() > rate(t) / peak:
            continue
        model = models.choose()
        duration = rng.lognormvariate(math.log(args.duration), 0.5)
        rows.append((t, model, round(duration, 4), models.memory[model]))
    rows.sort()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    real = commands.add_parser("azure", help="map an Azure LLM trace's arrivals onto models")
    real.add_argument("source", type=Path, help="azure-llm-2023-conv.csv or -code.csv")
    made = commands.add_parser("synthetic", help="Zipf popularity, chosen arrival pattern")
    made.add_argument("--pattern", choices=["uniform", "diurnal", "bursty"], default="diurnal")
    made.add_argument("--requests", type=int, default=20_000)
    made.add_argument("--hours", type=float, default=1.0)
    made.add_argument("--duration", type=float, default=1.0, help="median seconds per request")
    for command in (real, made):
        command.add_argument("--models", type=int, default=100)
        command.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.models < 1:
        parser.error("--models must be at least 1")
    rows = azure(args) if args.command == "azure" else synthetic(args)
    with open(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "model", "duration", "memory"])
        for t, model, duration, memory in rows:
            writer.writerow([f"{t:.4f}", model, f"{duration:.4f}", memory])
    used = len({row[1] for row in rows})
    print(f"{args.output}: {len(rows)} requests on {used} of {args.models} models", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
