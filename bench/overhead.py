"""What the process boundary costs: trivial engines in-process vs served by omni-runtime.

    python bench/overhead.py [--seconds 5] [--rounds 3] [--token] [--compare DIR]
                             [--shapes NAME,...]

Every row is measured for each request shape (--shapes; all by default):
  BYTES string        one BYTES tensor ["hello"], JSON (@bench/trivial)
  one FP32            one FP32 value, JSON (@bench/value)
  1000 FP32          a list of 1,000 floats, JSON (@bench/values)
  binary 1000 FP32   the same as a binary tensor (Inference-Header-Content-Length)
Rows:
  in-process call      EngineRunner decode → infer → encode, no HTTP (one Python loop)
  plain ASGI app       Starlette on uvicorn, the engine in the same process (bench/baseline_app.py)
  omni-runtime v2      omni-runtime serving the engine in a worker process, KServe v2 HTTP
  omni-runtime ai/run  the same, through /ai/run (BYTES string only)
  omni-runtime gRPC    the same request as a ModelInfer message over KServe v2 gRPC
HTTP rows are driven by wrk (Debian package `wrk`), gRPC rows by h2load (Debian package
`nghttp2-client`) sending a fixed ModelInfer message: both one thread, one connection per
request in flight for wrk and one connection with that many streams for h2load, at
concurrency 1 and 8, after a 1 s warm-up. h2load reports the mean latency, not percentiles:
the gRPC rows' p50 column is that mean and their p99 is left out.
The plain app and the runtime(s) run side by side, and each row is the median of --rounds
runs, taken in turn (plain app, runtime v2, gRPC, ..., then again): the machine's own ups and
downs fall on every row alike rather than on whichever was measured at the time.
Then time to first event of a streamed /ai/run (server-sent events) from a model that yields
a word every 20 ms.
With --token, omni-runtime runs with OMNI_API_TOKEN set and the load generators send it.
With --compare DIR, the omni-runtime rows are measured a second time, in the same run, with
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
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "packages" / "trivial"
MODEL = "@bench/trivial"
V2_BODY = json.dumps(
    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
)
AI_BODY = json.dumps({"text": "hello"})
VALUES = [i / 1000 for i in range(1000)]


def _v2(name: str, datatype: str, data: list[Any]) -> bytes:
    shape = [len(data)]
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                   "data": data}]}).encode()  # fmt: skip


def _binary(name: str, values: list[float]) -> tuple[bytes, int]:
    raw = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [len(values)],
                                     "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    return header.encode() + raw, len(header)


@dataclass(frozen=True)
class Shape:
    """One request body, as HTTP sends it and as a gRPC ModelInfer message."""

    model: str
    body: bytes
    header_length: int  # of a binary body's JSON part; 0: all JSON
    tensor: tuple[str, str, list[Any]]  # name, datatype, values
    raw: bool = False  # gRPC: raw_input_contents rather than typed contents


_BINARY, _BINARY_HEADER = _binary("values", VALUES)
SHAPES = {
    "BYTES string": Shape(MODEL, V2_BODY.encode(), 0, ("text", "BYTES", ["hello"])),
    "one FP32": Shape("@bench/value", _v2("value", "FP32", [0.5]), 0, ("value", "FP32", [0.5])),
    "1000 FP32": Shape("@bench/values", _v2("values", "FP32", VALUES), 0,
                        ("values", "FP32", VALUES)),
    "binary 1000 FP32": Shape("@bench/values", _BINARY, _BINARY_HEADER,
                               ("values", "FP32", VALUES), raw=True),
}  # fmt: skip


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


def _lua(data: bytes) -> str:
    """``data`` as a Lua string literal (decimal escapes for what is not printable)."""
    out = []
    for byte in data:
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def wrk(
    url: str,
    body: str | bytes,
    connections: int,
    seconds: float,
    token: str | None = None,
    header_length: int = 0,
    warm: bool = True,
) -> dict[str, float]:
    """``connections`` requests in flight for ``seconds``, after 1 s of the same where ``warm``."""
    data = body.encode() if isinstance(body, str) else body
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {_lua(data)}\n"
            + (
                f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n'
                if header_length
                else 'wrk.headers["Content-Type"] = "application/json"\n'
            )
            + (f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else "")
            + "done = function(summary, latency, requests)\n"
            '  io.write(string.format("OMNI %d %d %d %d %d\\n", summary.requests,'
            " summary.errors.status + summary.errors.connect + summary.errors.read"
            " + summary.errors.write + summary.errors.timeout,"
            " latency:percentile(50), latency:percentile(99), summary.duration))\n"
            "end\n"
        )
    try:
        if warm:
            subprocess.run(
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


def infer_message(shape: Shape) -> bytes:
    """``shape`` as one length-prefixed gRPC ModelInferRequest message."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=shape.model)
    name, datatype, values = shape.tensor
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
    if shape.raw:
        request.raw_input_contents.append(struct.pack(f"<{len(values)}f", *values))
    elif datatype == "BYTES":
        tensor.contents.bytes_contents.extend(v.encode() for v in values)
    else:
        tensor.contents.fp32_contents.extend(values)
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def h2load(
    address: str,
    shape: Shape,
    streams: int,
    seconds: float,
    token: str | None = None,
    warm: bool = True,
) -> dict[str, float]:
    """ModelInfer calls from h2load: one connection, ``streams`` calls in flight (after 1 s of
    the same where ``warm``)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as body:
        body.write(infer_message(shape))
    url = f"http://{address}/inference.GRPCInferenceService/ModelInfer"
    command = [
        "h2load", "-c1", f"-m{streams}", "-t1", f"-D{seconds:.0f}",
        *(["--warm-up-time=1"] if warm else []),
        "-d", body.name, "-H", "content-type: application/grpc", "-H", "te: trailers",
        *(["-H", f"authorization: Bearer {token}"] if token else []), url,
    ]  # fmt: skip
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(body.name)
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    assert done and rps and mean, out
    if int(done.group(2)) or int(done.group(3)):
        raise RuntimeError(f"h2load saw failed calls against {url}:\n{out}")
    text = mean.group(1)
    ms = float(text[:-2]) * {"us": 1e-3, "ms": 1.0}[text[-2:]] if text[-2:] in ("us", "ms") \
        else float(text[:-1]) * 1e3  # fmt: skip
    return {"p50_ms": ms, "p99_ms": float("nan"), "rps": float(rps.group(1))}


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


Row = tuple[str, str, int, dict[str, float]]  # shape, path, concurrency, figures


@dataclass(frozen=True)
class Server:
    """One server under test: the plain app, or an omni-runtime (``label``: its rows' name)."""

    label: str
    port: int
    grpc_port: int | None = None  # None: the plain app (HTTP only)
    token: str | None = None


def measure(servers: list[Server], shapes: list[str], seconds: float, rounds: int) -> list[Row]:
    """Every path of every server, for each shape and concurrency, in ``rounds`` rounds that
    take each path once in turn (so that what the machine does meanwhile falls on all of them
    alike); each row is the median of its rounds."""
    samples: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for name in shapes:
        shape = SHAPES[name]
        for c in (1, 8):
            for round_ in range(rounds):
                warm = round_ == 0
                for server in servers:
                    url = f"http://127.0.0.1:{server.port}/v2/models/{shape.model}/infer"
                    figures = wrk(url, shape.body, c, seconds, server.token,
                                  shape.header_length, warm)  # fmt: skip
                    if server.grpc_port is None:
                        samples.setdefault((name, server.label, c), []).append(figures)
                        continue
                    samples.setdefault((name, f"{server.label} v2", c), []).append(figures)
                    address = f"127.0.0.1:{server.grpc_port}"
                    figures = h2load(address, shape, c, seconds, server.token, warm)
                    samples.setdefault((name, f"{server.label} gRPC", c), []).append(figures)
                    if name == "BYTES string":
                        url = f"http://127.0.0.1:{server.port}/ai/run/{MODEL}"
                        figures = wrk(url, AI_BODY, c, seconds, server.token, 0, warm)
                        samples.setdefault((name, f"{server.label} ai/run", c), []).append(figures)
    return [(name, path, c, _median(runs)) for (name, path, c), runs in samples.items()]


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def start_omni(
    label: str, token: str | None, runtime: Path | None = None
) -> tuple[Server, subprocess.Popen[str]]:
    """omni-runtime serving the trivial engines; ``runtime``: the omni_runtime source to run
    instead of the installed one."""
    env = {"OMNI_API_TOKEN": token} if token else {}
    if runtime is not None:
        env["PYTHONPATH"] = str(runtime)
    port, grpc_port = free_port(), free_port()
    process = start(
        [sys.executable, "-m", "omni_runtime.cli", "serve", str(PACKAGE), "--port", str(port),
         "--grpc-port", str(grpc_port), "--log-level", "warning"],
        port, ready="omni-runtime: serving", env=env,
    )  # fmt: skip
    return Server(label, port, grpc_port, token), process


def settle(port: int, shapes: list[str], token: str | None, quiet: float = 8.0) -> None:
    """Bring every model to the replicas its load gives it (3 s at concurrency 8 each), then
    wait ``quiet`` seconds: what starting replicas leaves running for a while (pre-warmed
    processes importing what the workers used) must not share the CPU with the measurements."""
    for name in shapes:
        shape = SHAPES[name]
        url = f"http://127.0.0.1:{port}/v2/models/{shape.model}/infer"
        wrk(url, shape.body, 8, 3, token, shape.header_length)
    time.sleep(quiet)


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
        "--token", action="store_true", help="serve with OMNI_API_TOKEN; the load sends it"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also measure the runtime of the checkout DIR (its runtime/ on PYTHONPATH)",
    )
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each row, taken in turn; the median counts"
    )
    args = parser.parse_args()
    token = "bench-token" if args.token else None
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"--shapes: unknown {unknown} (known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            print(f"bench/overhead.py needs {tool}: apt-get install {package}", file=sys.stderr)
            return 2

    rows: list[Row] = [("BYTES string", "in-process call", 1, in_process(args.seconds))]
    port = free_port()
    processes = [
        start(
            [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--port", str(port),
             "--log-level", "warning", "--no-access-log", "--loop", "uvloop",
             "--http", "httptools"],
            port,
        )
    ]  # fmt: skip
    servers = [Server("plain ASGI app", port)]
    try:
        omni, process = start_omni("omni-runtime", token)
        processes.append(process)
        servers.append(omni)
        if args.compare is not None:
            runtime = (args.compare / "runtime").resolve()
            if not (runtime / "omni_runtime").is_dir():
                print(f"--compare: {runtime}/omni_runtime does not exist", file=sys.stderr)
                return 2
            other, process = start_omni(args.compare.name, token, runtime)
            processes.append(process)
            servers.append(other)
        for server in servers[1:]:
            settle(server.port, shapes, token, quiet=0)
        time.sleep(8)
        rows.extend(measure(servers, shapes, args.seconds, args.rounds))
    finally:
        for process in processes:
            stop(process)

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
    report(rows, sse, args.seconds, args.rounds)
    return 0


def report(rows: list[Row], sse: dict[str, float], seconds: float, rounds: int) -> None:
    base = {(shape, c): r for shape, path, c, r in rows if path == "plain ASGI app"}
    print(f"{'shape':<19}{'path':<24}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
          f"{'req/s vs ASGI':>15}{'p50 vs ASGI':>13}")  # fmt: skip
    for shape, path, c, r in rows:
        plain = base.get((shape, c))
        compared = plain is not None and not path.startswith(("in-", "plain"))
        ratio = f"{r['rps'] / plain['rps']:.2f}" if compared and plain else "-"
        p50 = f"{r['p50_ms'] / plain['p50_ms']:.2f}" if compared and plain else "-"
        p99 = "-" if r["p99_ms"] != r["p99_ms"] else f"{r['p99_ms']:.3f}"  # NaN: h2load's
        print(f"{shape:<19}{path:<24}{c:>5}{r['p50_ms']:>9.3f}{p99:>9}{r['rps']:>9.0f}"
              f"{ratio:>15}{p50:>13}")  # fmt: skip
    print(
        "\ntargets, per shape (one run): HTTP req/s at conc 8 vs the plain app (>= 1.10), "
        "p50 at conc 1 vs the plain app (<= 1.30), gRPC req/s vs HTTP at conc 8 (>= 0.50)"
    )
    figures = {(shape, path, c): r for shape, path, c, r in rows}
    for shape in dict.fromkeys(s for s, *_ in rows):
        http8 = figures.get((shape, "omni-runtime v2", 8))
        http1 = figures.get((shape, "omni-runtime v2", 1))
        grpc8 = figures.get((shape, "omni-runtime gRPC", 8))
        if not (http8 and http1 and grpc8):
            continue
        print(f"  {shape:<19} HTTP/plain {http8['rps'] / base[(shape, 8)]['rps']:.2f}   "
              f"p50 c1/plain {http1['p50_ms'] / base[(shape, 1)]['p50_ms']:.2f}   "
              f"gRPC/HTTP {grpc8['rps'] / http8['rps']:.2f}")  # fmt: skip
    print(
        f"\nstreamed /ai/run, 10 words 20 ms apart: first event {sse['first_ms']:.1f} ms, "
        f"[DONE] {sse['done_ms']:.1f} ms (median of 20); cpu count {os.cpu_count()}, "
        f"the median of {rounds} runs of {seconds:.0f}s each, taken in turn"
    )


if __name__ == "__main__":
    sys.exit(main())
