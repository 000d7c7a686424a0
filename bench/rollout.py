"""What a rollout costs the requests that run through it.

    python bench/rollout.py [--clients 4] [--seconds 6]

One runtime serving version 1.0.0 of a small model (a replica kept warm), under constant load
from --clients concurrent clients (each sends its next request when the last is answered):
--seconds of load, then `rollout` to 2.0.0 (all at once) while the load goes on, then
--seconds more. Prints p50/p99 latency before, during (from the command to the old version's
last answer) and after the rollout, the ratio of p99 during to p99 before, how long the
command took to promotion, and the time from the command to the old version's last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ENGINE = """
from pydantic import BaseModel
from omni_sdk import Engine, hookimpl


class Request(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


class Rolled(Engine):
    name = "@bench/rolled"

    def infer(self, request: Request) -> Answer:
        return Answer(text=request.text)


@hookimpl
def register_engines(register):
    register(Rolled)
"""


def package(root: Path, version: str) -> Path:
    directory = root / f"rolled-{version}"
    directory.mkdir()
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "omni-bench-rolled"\nversion = "{version}"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\nrolled = "rolled_model"\n'
    )
    (directory / "rolled_model.py").write_text(ENGINE)
    return directory


async def load(url: str, clients: int, stop: asyncio.Event) -> list[tuple[float, float, str]]:
    """(sent, seconds, version) of every answer; a non-200 answer stops the benchmark."""
    answers: list[tuple[float, float, str]] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                answer = await http.post("/ai/run/@bench/rolled", json={"text": "x"})
                if answer.status_code != 200:
                    raise RuntimeError(f"a request failed: {answer.status_code} {answer.text}")
                took = time.monotonic() - sent
                answers.append((sent, took, answer.headers["omni-model-version"]))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


async def run(url: str, v2: Path, clients: int, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(load(url, clients, stop))
    await asyncio.sleep(seconds)
    commanded = time.monotonic()
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "omni_runtime.cli", "rollout", "@bench/rolled",
        "--package", str(v2), "--url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await command.communicate()
    promoted = time.monotonic() - commanded
    if command.returncode != 0:
        raise RuntimeError(f"the rollout failed: {output.decode()}")
    await asyncio.sleep(seconds)
    stop.set()
    answers = await task
    last_old = max(sent + took for sent, took, v in answers if v == "1.0.0")
    phases = {
        "before": [t for s, t, _ in answers if s < commanded],
        "during": [t for s, t, _ in answers if commanded <= s <= last_old],
        "after": [t for s, t, _ in answers if s > last_old],
    }
    print(f"{'phase':<8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for phase, values in phases.items():
        values.sort()
        p50 = values[len(values) // 2] * 1e3 if values else float("nan")
        p99 = values[int(len(values) * 0.99)] * 1e3 if values else float("nan")
        print(f"{phase:<8}{len(values):>10}{p50:>9.2f}{p99:>9.2f}")
    before = sorted(phases["before"])
    during = sorted(phases["during"]) or [float("nan")]
    ratio = during[int(len(during) * 0.99)] / before[int(len(before) * 0.99)]
    print(f"\np99 during / p99 before: {ratio:.2f}")
    print(f"command to promoted: {promoted:.2f} s; to the old version's last answer: "
          f"{last_old - commanded:.2f} s; failed requests: 0 of {len(answers)}")  # fmt: skip
    print(f"({clients} clients, cpu count {os.cpu_count()}, one run)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omni-rollout-bench-") as tmp:
        root = Path(tmp)
        v1, v2 = package(root, "1.0.0"), package(root, "2.0.0")
        config = root / "omni.toml"
        config.write_text('[models."@bench/rolled".scaling]\nmin_replicas = 1\n')
        runtime = subprocess.Popen(
            [sys.executable, "-m", "omni_runtime.cli", "serve", str(v1), "--port", "0",
             "--shared-env", "--config", str(config), "--state-dir", str(root / "state"),
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert runtime.stdout is not None
            url = ""
            for line in runtime.stdout:
                match = re.search(r"serving \d+ of \d+ models at (\S+)", line)
                if match:
                    url = match.group(1)
                    break
            if not url:
                print("the runtime did not start", file=sys.stderr)
                return 1
            asyncio.run(run(url, v2, args.clients, args.seconds))
        finally:
            runtime.terminate()
            runtime.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
