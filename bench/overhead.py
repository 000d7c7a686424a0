"""What the process boundary costs: a trivial engine in-process vs served by omni-runtime.

    python bench/overhead.py [--seconds 5] [--token]

Rows:
  in-process call      EngineRunner decode → infer → encode, no HTTP (one Python loop)
  plain ASGI app       Starlette on uvicorn, the engine in the same process (bench/baseline_app.py)
  omni-runtime v2      omni-runtime serving the engine in a worker process, KServe v2 JSON
  omni-runtime ai/run  the same, through /ai/run
  omni-runtime gRPC    the same engine over KServe v2 gRPC (--grpc-port)
HTTP rows are driven by wrk (Debian package `wrk`), one thread, at concurrency 1 and 8. gRPC
rows by tritonclient.grpc.aio in one process with that many requests in flight: on two cores
the Python driver shares the CPU with the runtime, so gRPC figures are a floor.
Then time to first event of a streamed /ai/run (server-sent events) from a model that yields
a word every 20 ms.
With --token, omni-runtime runs with OMNI_API_TOKEN set and wrk sends it on every request.
With --compare DIR, the v2 and ai/run rows are measured a second time, in the same run, with
the runtime (omni_runtime) of another checkout DIR, e.g. a worktree of an older commit:
``git worktree add /tmp/before REV && python bench/overhead.py --compare /tmp/before``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "packages" / "trivial"
MODEL = "@bench/trivial"
V2_BODY = json.dumps(
    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
)
AI_BODY = json.dumps({"text": "hello"})


def in_process(seconds: float) -> dict[str, float]:
    sys.path.insert(0, str(PACKAGE))
    from omni_bench_trivial import Trivial

    from omni_sdk._serving import EngineRunner

    runner = EngineRunner(Trivial())
    body = V2_BODY.encode()
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        prepared = runner.prepare_v2(body, 0)
        runner.respond(prepared, runner.run([prepared])[0])
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return {
        "p50_ms": samples[len(samples) // 2] / 1e6,
        "p99_ms": samples[int(len(samples) * 0.99)] / 1e6,
        "rps": len(samples) / seconds,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def wrk(
    url: str, body: str, connections: int, seconds: float, token: str | None = None
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            + (f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else "")
            + "done = function(summary, latency, requests)\n"
            '  io.write(string.format("OMNI %d %d %d %d %d\\n", summary.requests,'
            " summary.errors.status + summary.errors.connect + summary.errors.read"
            " + summary.errors.write + summary.errors.timeout,"
            " latency:percentile(50), latency:percentile(99), summary.duration))\n"
            "end\n"
        )
    try:
        subprocess.run(  # warm-up
            ["wrk", "-t1", f"-c{connections}", "-d1s", "-s", script.name, url],
            capture_output=True, check=True,
        )  # fmt: skip
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "-s", script.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    match = re.search(r"OMNI (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    assert match, out
    requests, errors, p50_us, p99_us, duration_us = map(int, match.groups())
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors against {url}:\n{out}")
    return {"p50_ms": p50_us / 1000, "p99_ms": p99_us / 1000, "rps": requests / (duration_us / 1e6)}


def grpc_load(address: str, connections: int, seconds: float) -> dict[str, float]:
    """Requests in flight over KServe v2 gRPC from one asyncio process."""
    import asyncio

    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    async def run() -> list[int]:
        client = grpcclient.InferenceServerClient(address)
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        samples: list[int] = []

        async def one(until: float) -> None:
            while time.perf_counter() < until:
                start = time.perf_counter_ns()
                await client.infer(MODEL, [text])
                samples.append(time.perf_counter_ns() - start)

        await asyncio.gather(*(one(time.perf_counter() + 1.0) for _ in range(connections)))
        samples.clear()  # warm-up
        await asyncio.gather(*(one(time.perf_counter() + seconds) for _ in range(connections)))
        await client.close()
        return samples

    samples = sorted(asyncio.run(run()))
    return {
        "p50_ms": samples[len(samples) // 2] / 1e6,
        "p99_ms": samples[int(len(samples) * 0.99)] / 1e6,
        "rps": len(samples) / seconds,
    }


def first_event(url: str, runs: int = 20) -> dict[str, float]:
    """Median time to the first server-sent event and to [DONE] of a streamed /ai/run."""
    import httpx

    body = {"prompt": "one two three", "max_tokens": 10, "delay": 0.02, "stream": True}
    firsts, totals = [], []
    with httpx.Client(timeout=60) as client:
        for index in range(runs + 2):
            started = time.perf_counter()
            first = 0.0
            with client.stream("POST", url, json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and not first:
                        first = time.perf_counter() - started
            if index >= 2:  # the first two start the replica
                firsts.append(first)
                totals.append(time.perf_counter() - started)
    firsts.sort()
    totals.sort()
    return {"first_ms": firsts[len(firsts) // 2] * 1e3, "done_ms": totals[len(totals) // 2] * 1e3}


def omni_rows(
    label: str, seconds: float, token: str | None, runtime: Path | None = None
) -> list[tuple[str, int, dict[str, float]]]:
    """omni-runtime's rows: v2 and ai/run at concurrency 1 and 8, gRPC unless ``token``;
    ``runtime``: the omni_runtime source to run instead of the installed one."""
    env = {"OMNI_API_TOKEN": token} if token else {}
    if runtime is not None:
        env["PYTHONPATH"] = str(runtime)
    rows: list[tuple[str, int, dict[str, float]]] = []
    port, grpc_port = free_port(), free_port()
    omni = start(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(PACKAGE), "--port", str(port),
         "--grpc-port", str(grpc_port), "--log-level", "warning"],
        port, ready="omni-runtime: serving", env=env,
    )  # fmt: skip
    try:
        for c in (1, 8):
            url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
            rows.append((f"{label} v2", c, wrk(url, V2_BODY, c, seconds, token)))
        for c in (1, 8):
            url = f"http://127.0.0.1:{port}/ai/run/{MODEL}"
            rows.append((f"{label} ai/run", c, wrk(url, AI_BODY, c, seconds, token)))
        if not token:
            for c in (1, 8):
                address = f"127.0.0.1:{grpc_port}"
                rows.append((f"{label} gRPC", c, grpc_load(address, c, seconds)))
    finally:
        stop(omni)
    return rows


def start(
    command: list[str], port: int, ready: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=HERE.parent,
        env=dict(os.environ, **(env or {})),
    )
    if ready:
        assert process.stdout is not None
        for line in process.stdout:
            if ready in line:
                break
    wait_http(port)
    return process


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--token", action="store_true", help="serve with OMNI_API_TOKEN; wrk sends it"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also measure the runtime of the checkout DIR (its runtime/ on PYTHONPATH)",
    )
    args = parser.parse_args()
    token = "bench-token" if args.token else None
    if shutil.which("wrk") is None:
        print("bench/overhead.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    rows: list[tuple[str, int, dict[str, float]]] = []
    rows.append(("in-process call", 1, in_process(args.seconds)))

    port = free_port()
    baseline = start(
        [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--loop", "uvloop", "--http", "httptools"],
        port,
    )  # fmt: skip
    try:
        for c in (1, 8):
            url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
            rows.append(("plain ASGI app", c, wrk(url, V2_BODY, c, args.seconds)))
    finally:
        stop(baseline)

    rows.extend(omni_rows("omni-runtime", args.seconds, token))
    if args.compare is not None:
        runtime = (args.compare / "runtime").resolve()
        if not (runtime / "omni_runtime").is_dir():
            print(f"--compare: {runtime}/omni_runtime does not exist", file=sys.stderr)
            return 2
        rows.extend(omni_rows(f"{args.compare.name}", args.seconds, token, runtime))

    port = free_port()
    streams = start(
        [sys.executable, "-m", "omni_runtime.cli", "serve",
         str(HERE.parent / "tests" / "fixtures" / "packages" / "stream-models"),
         "--port", str(port), "--log-level", "warning"],
        port, ready="omni-runtime: serving",
    )  # fmt: skip
    try:
        sse = first_event(f"http://127.0.0.1:{port}/ai/run/@test/words")
    finally:
        stop(streams)

    base = {c: r for name, c, r in rows if name == "plain ASGI app"}
    direct = rows[0][2]
    print(f"{'path':<26}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
          f"{'+p50 vs call':>14}{'req/s vs ASGI':>15}")  # fmt: skip
    for name, c, r in rows:
        added = f"{(r['p50_ms'] - direct['p50_ms']):.3f}" if name != "in-process call" else "-"
        ratio = f"{r['rps'] / base[c]['rps']:.2f}" if not name.startswith(("in-", "plain")) else "-"
        print(f"{name:<26}{c:>5}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['rps']:>9.0f}"
              f"{added:>14}{ratio:>15}")  # fmt: skip
    print(
        f"\nstreamed /ai/run, 10 words 20 ms apart: first event {sse['first_ms']:.1f} ms, "
        f"[DONE] {sse['done_ms']:.1f} ms (median of 20)"
    )
    omni_c1 = next(r for name, c, r in rows if name == "omni-runtime v2" and c == 1)
    plain_c1 = base[1]
    print(
        f"\nadded p50 at concurrency 1, omni-runtime v2 over the plain ASGI app: "
        f"{omni_c1['p50_ms'] - plain_c1['p50_ms']:.3f} ms "
        f"(cpu count {os.cpu_count()}, median of one {args.seconds:.0f}s run each)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
