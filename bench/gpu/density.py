"""Many small GPU models on one card, their quotas adding up to several times its memory.

    python bench/gpu/density.py [--models 8] [--overcommit 3] [--seconds 20]

Each of --models packages holds a plain Engine that keeps a block of "weights" on the GPU and,
per request, reads every page of it (what a transformer does per token) and runs a small matmul.
The runtime gives every model a quota (`resources.gpu_memory`) of overcommit x card / models, so
the quotas together ask for --overcommit times the card, as Workers AI's models do. What the
models really allocate stays within --fill of the card's free memory (default 0.8): the device
notes of this workplace forbid asking for more managed memory than the card has free, since that
can hang the GPU. On your own hardware, --fill above 1 oversubscribes it for real.

It prints per-model p50/p99 latency with all models served together, against the same model
served alone, and the GPU memory each model's worker reports through libomnicuda.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.runtime import serve  # noqa: E402

MODULE = """
from __future__ import annotations

import torch
from pydantic import BaseModel

from omni_sdk import Engine, LoadContext, hookimpl

WEIGHT_BYTES = {weight_bytes}


class Step(BaseModel):
    rows: int = 64


class Result(BaseModel):
    checksum: float


class Dense(Engine):
    name = "@bench/gpu-{index}"

    def load(self, ctx: LoadContext) -> None:
        self.weights = torch.ones(WEIGHT_BYTES // 2, dtype=torch.float16, device=ctx.device)
        self.matrix = torch.randn(1024, 1024, device=ctx.device)

    def infer(self, request: Step) -> Result:
        with torch.inference_mode():
            touched = self.weights[:: 2048].float().sum()  # one read per 4 KiB page
            product = self.matrix[: request.rows] @ self.matrix
            torch.cuda.synchronize()
        return Result(checksum=float(touched + product.sum()))


@hookimpl
def register_engines(register):
    register(Dense)
"""


def card_memory() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu/density.py needs a GPU and a CUDA build of torch")
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def write_packages(root: Path, models: int, quota: int, weight_bytes: int) -> None:
    config = []
    for index in range(models):
        package = root / f"gpu-{index}"
        package.mkdir()
        (package / "pyproject.toml").write_text(
            f'[project]\nname = "omni-bench-gpu-{index}"\nversion = "0.1.0"\n'
            f'[project.entry-points.omni]\ngpu = "bench_gpu_{index}"\n'
        )
        (package / f"bench_gpu_{index}.py").write_text(
            MODULE.format(weight_bytes=weight_bytes, index=index)
        )
        config.append(
            f'[models."@bench/gpu-{index}"]\ndevice = "cuda"\n'
            f'[models."@bench/gpu-{index}".resources]\n'
            f"gpu_memory = {quota}\nmemory = {weight_bytes * 2 + (4 << 30)}\n"
        )
    (root / "omni.toml").write_text("\n".join(config))


def drive(url: str, names: list[str], seconds: float) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in names}

    def one(name: str) -> None:
        deadline = time.monotonic() + seconds
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = http.post(f"/ai/run/{name}", json={"rows": 64})
                response.raise_for_status()
                latencies[name].append(time.perf_counter() - started)

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def gpu_memory(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    usage = {}
    for line in text.splitlines():
        if line.startswith('omni_model_memory_bytes{kind="gpu"'):
            name = line.split('model="')[1].split('"')[0]
            usage[name] = float(line.rsplit(" ", 1)[1])
    return usage


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--overcommit", type=float, default=3.0)
    parser.add_argument("--fill", type=float, default=0.8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    free, total = card_memory()
    quota = int(total * args.overcommit / args.models)
    weight_bytes = int(min(quota, free * args.fill / args.models)) & ~0xFFFF
    print(
        f"card {total / 2**30:.1f} GiB ({free / 2**30:.1f} free); {args.models} models, quota "
        f"{quota / 2**30:.2f} GiB each ({args.overcommit:.1f}x the card together), "
        f"{weight_bytes / 2**30:.2f} GiB of weights each"
    )
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv"], check=False)
    with tempfile.TemporaryDirectory(prefix="omni-density-") as scratch:
        root = Path(scratch)
        write_packages(root, args.models, quota, weight_bytes)
        with serve(root / "gpu-0", extra=["--config", str(root / "omni.toml")]) as alone:
            solo = drive(alone.url, ["@bench/gpu-0"], args.seconds)["@bench/gpu-0"]
        with serve(root) as together:
            names = [f"@bench/gpu-{i}" for i in range(args.models)]
            shared = drive(together.url, names, args.seconds)
            usage = gpu_memory(together.url)
    print(f"\n{'model':<16}{'p50 ms':>9}{'p99 ms':>9}{'req':>7}{'gpu GiB':>9}  vs alone")
    print(f"{'gpu-0 alone':<16}{percentile(solo, 0.5):>9.2f}{percentile(solo, 0.99):>9.2f}"
          f"{len(solo):>7}{'':>9}  1.00")  # fmt: skip
    base = statistics.median(solo)
    for name, samples in shared.items():
        p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
        held = usage.get(name, 0) / 2**30
        ratio = statistics.median(samples) / base
        short = name.split("/")[1]
        print(f"{short:<16}{p50:>9.2f}{p99:>9.2f}{len(samples):>7}{held:>9.2f}  {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
