"""What the fleet costs and what it buys: one forwarded hop, and model-aware routing.

    python bench/fleet.py [--wrk-seconds 5] [--seconds 60] [--models 20] [--quick]

One etcd member (``tests/fleet_etcd.py``) on free ports; runtimes run with ``--shared-env``.

1. **The cost of one hop.** Node a serves bench/packages/trivial, node b serves nothing of its
   own, and ``omni-runtime route`` runs a router. ``/ai/run`` and KServe v2 requests for
   ``@bench/trivial`` are driven by wrk (bench/overhead.py's helper: one thread, a 1 s warm-up)
   at 1 and 8 connections: straight to a, through b (b forwards to a), and through the router.
   Before timing, each path's answers are checked to carry the route they should
   (``Omni-Node: a``; ``Omni-Route: b,a`` and ``router,a``).
2. **Model-aware routing against random.** A generated package of ``--models`` trivial models
   whose ``load`` sleeps ``--load-seconds``, so that a cold start costs something; each model
   has one replica at most and an ``idle_timeout`` of ``--idle-timeout``, so models fall to
   zero during the trace (pre-warming is off: ``prewarm_timeout = 0``). A seeded synthetic
   trace over ``--seconds``: Zipf popularity (rank r with weight 1/r^1.1) at ``--rate``
   requests/s (Poisson), and bursts (about every 15 s, 8 requests within 2 s for a model
   chosen uniformly). One asyncio client (httpx.AsyncClient) replays it at its own times,
   twice, each time on three fresh nodes serving the package:
     fleet:  the nodes joined with ``--fleet``; every request goes to the router;
     alone:  the nodes without ``--fleet``, each on its own; every request goes to a node
             chosen uniformly at random (seeded): routing that knows nothing of models.
   Printed per run: requests, errors, cold starts (``omni_model_cold_starts_total`` summed over
   the nodes) and what one took on average (spawn to ready), p50 and p99 latency as the client
   saw it, the share of requests answered within ``--slo``, and the requests each node served.

Prints tables, no verdict: compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from bench.overhead import AI_BODY, MODEL, PACKAGE, V2_BODY, wrk  # noqa: E402
from tests.fleet_etcd import EtcdCluster  # noqa: E402

READY = re.compile(r"omni-runtime: (?:serving \d+ of \d+ models|routing for the fleet) at (\S+)")
Row = tuple[str, str, int, dict[str, float]]  # path, api, connections, wrk's figures


# -- runtimes ----------------------------------------------------------------------------


class Runtime:
    """One ``omni-runtime`` process, from its ready line until ``stop``."""

    def __init__(self, name: str, command: list[str], timeout: float = 120.0) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=50)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_runtime.cli", *command, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
        ready = threading.Event()
        self.url = ""

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line)
                match = READY.search(line)
                if match and not self.url:
                    self.url = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError(f"{name} did not start: {''.join(self.lines)}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running(name: str, command: list[str]) -> Iterator[Runtime]:
    runtime = Runtime(name, command)
    try:
        yield runtime
    finally:
        runtime.stop()


def node(name: str, paths: list[Path], fleet: str | None, config: Path | None = None) -> list[str]:
    command = ["serve", *map(str, paths), "--port", "0", "--shared-env"]
    if fleet is not None:
        command += ["--fleet", fleet, "--node-name", name]
    if config is not None:
        command += ["--config", str(config)]
    return command


def router(fleet: str) -> list[str]:
    return ["route", "--fleet", fleet, "--node-name", "router", "--port", "0"]


def total(metrics: str, name: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


# -- 1. the cost of one hop --------------------------------------------------------------


def expect_route(url: str, path: str, body: str, node: str, route: str | None) -> None:
    """Ask until the answer comes from ``node`` by ``route`` (the peers' load reports arrive
    twice a second); RuntimeError when it never does."""
    deadline = time.monotonic() + 30
    seen = ""
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            answer = client.post(
                url + path, content=body, headers={"Content-Type": "application/json"}
            )
            got = (answer.headers.get("omni-node"), answer.headers.get("omni-route"))
            if answer.status_code == 200 and got == (node, route):
                return
            seen = f"{answer.status_code} node={got[0]} route={got[1]} {answer.text[:200]}"
            time.sleep(0.25)
    raise RuntimeError(f"{url}{path}: expected node {node} by route {route}, got {seen}")


def hop(seconds: float) -> list[Row]:
    paths = {
        "/ai/run": (f"/ai/run/{MODEL}", AI_BODY),
        "v2": (f"/v2/models/{MODEL}/infer", V2_BODY),
    }
    rows: list[Row] = []
    with EtcdCluster(1) as etcd, ExitStack() as stack:
        a = stack.enter_context(running("node a", node("a", [PACKAGE], etcd.url)))
        b = stack.enter_context(running("node b", node("b", [], etcd.url)))
        r = stack.enter_context(running("router", router(etcd.url)))
        ways = [
            ("direct to a", a, None),
            ("through node b", b, "b,a"),
            ("through router", r, "router,a"),
        ]
        for _, runtime, route in ways:
            for path, body in paths.values():
                expect_route(runtime.url, path, body, "a", route)
        for connections in (1, 8):
            for api, (path, body) in paths.items():
                for label, runtime, _ in ways:
                    try:
                        figures = wrk(runtime.url + path, body, connections, seconds)
                    except RuntimeError as exc:  # errors or timeouts: a row without figures
                        print(f"\n{label} {api} c={connections}: {exc}", file=sys.stderr)
                        figures = {}
                    rows.append((label, api, connections, figures))
                    print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return rows


def print_hop(rows: list[Row]) -> None:
    direct = {(api, c): r for label, api, c, r in rows if label == "direct to a"}
    print(
        f"{'path':<16}{'api':>8}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}"
        f"{'+p50 ms':>9}{'p50 ×':>7}{'req/s ×':>9}"
    )
    for label, api, c, r in rows:
        base = direct[(api, c)]
        if not r or not base:
            print(f"{label:<16}{api:>8}{c:>5}  wrk saw errors (the message is above)")
            continue
        print(
            f"{label:<16}{api:>8}{c:>5}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['rps']:>8.0f}"
            f"{r['p50_ms'] - base['p50_ms']:>9.3f}{r['p50_ms'] / base['p50_ms']:>7.2f}"
            f"{r['rps'] / base['rps']:>9.2f}"
        )


# -- 2. model-aware routing against random -----------------------------------------------

PACKAGE_SOURCE = '''
"""Generated by bench/fleet.py: trivial models whose load takes a while."""

import json
import time
from pathlib import Path

from pydantic import BaseModel

from omni_sdk import Engine, LoadContext, Resources, hookimpl

SETTINGS = json.loads((Path(__file__).parent / "models.json").read_text())


class Text(BaseModel):
    text: str


def engine(name: str) -> type[Engine]:
    class Model(Engine):
        resources = Resources(memory="256MiB")

        def load(self, ctx: LoadContext) -> None:
            time.sleep(SETTINGS["load_seconds"])

        def infer(self, request: Text) -> Text:
            return request

    Model.name = name
    Model.__name__ = Model.__qualname__ = "Model_" + name.rsplit("/", 1)[-1]
    return Model


@hookimpl
def register_engines(register):
    for name in SETTINGS["models"]:
        register(engine(name))
'''


def write_package(root: Path, names: list[str], load_seconds: float) -> Path:
    package = root / "fleet-models"
    package.mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        '[project]\nname = "omni-bench-fleet-models"\nversion = "0.1.0"\n'
        'dependencies = ["omni-sdk"]\n\n[project.entry-points.omni]\n'
        'fleet = "omni_bench_fleet_models"\n'
    )
    (package / "omni_bench_fleet_models.py").write_text(PACKAGE_SOURCE)
    settings = {"models": names, "load_seconds": load_seconds}
    (package / "models.json").write_text(json.dumps(settings))
    for path in (root, package, *package.iterdir()):  # models run as users of their own
        path.chmod(0o755 if path.is_dir() else 0o644)
    return package


def write_config(path: Path, names: list[str], idle_timeout: float) -> None:
    # Without pre-warming a cold start costs half the CPU (no spare process to replace), and
    # three nodes on one small machine have little to spare.
    lines = ["[scheduler]", "prewarm_timeout = 0", ""]
    for name in names:
        lines += [
            f'[models."{name}".scaling]',
            f'idle_timeout = "{idle_timeout:g}s"',
            "max_replicas = 1",
            "max_queue_size = 1024",
            "",
        ]
    path.write_text("\n".join(lines))
    path.chmod(0o644)


@dataclass(frozen=True)
class Request:
    at: float  # seconds from the start of the replay
    model: str


def make_trace(names: list[str], seconds: float, rate: float, seed: int) -> list[Request]:
    """Zipf popularity (weight 1/r^1.1 for rank r) at ``rate`` requests/s, Poisson; bursts
    about every 15 s (Poisson), each 8 requests within 2 s for a model chosen uniformly."""
    rng = random.Random(seed)
    weights = [1 / rank**1.1 for rank in range(1, len(names) + 1)]
    trace = []
    t = 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        trace.append(Request(t, rng.choices(names, weights)[0]))
    t = 0.0
    while (t := t + rng.expovariate(1 / 15)) < seconds - 2:
        model = rng.choice(names)
        trace += [Request(t + rng.uniform(0, 2), model) for _ in range(8)]
    return sorted(trace, key=lambda request: request.at)


@dataclass
class Outcome:
    latencies: list[float]  # seconds, of the requests answered 200
    errors: int
    served: Counter[str]  # requests per node that served them
    off_route: int  # answers whose Omni-Route was not the one expected
    lag: float  # the most a request was sent after its time in the trace
    cold_starts: float = 0.0
    start_seconds: float = 0.0  # what a start took on average, spawn to ready


async def replay(trace: list[Request], targets: dict[str, str], seed: int) -> Outcome:
    """Send each request at its time to one of ``targets`` (name: URL) chosen uniformly
    (seeded). With one target (a router), every answer must name it in ``Omni-Route``."""
    rng = random.Random(seed)
    body = json.dumps({"text": "hello"})
    outcome = Outcome([], 0, Counter(), 0, 0.0)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        loop = asyncio.get_running_loop()
        base = loop.time() + 0.5
        names = sorted(targets)

        async def one(target: str, model: str) -> None:
            sent = time.perf_counter()
            try:
                answer = await client.post(
                    f"{targets[target]}/ai/run/{model}",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError:
                outcome.errors += 1
                return
            elapsed = time.perf_counter() - sent
            if answer.status_code != 200:
                outcome.errors += 1
                return
            outcome.latencies.append(elapsed)
            served = answer.headers.get("omni-node", target)
            outcome.served[served] += 1
            route = answer.headers.get("omni-route")
            if len(targets) == 1 and route != f"{target},{served}":
                outcome.off_route += 1

        tasks = []
        for request in trace:
            await asyncio.sleep(max(0.0, base + request.at - loop.time()))
            outcome.lag = max(outcome.lag, loop.time() - (base + request.at))
            tasks.append(asyncio.create_task(one(rng.choice(names), request.model)))
        await asyncio.gather(*tasks)
    return outcome


def wait_fleet(router_url: str, names: list[str], nodes: int) -> None:
    """Until the router has fresh load reports from ``nodes`` nodes with every model."""
    deadline = time.monotonic() + 60
    reason = ""
    while time.monotonic() < deadline:
        index = httpx.post(f"{router_url}/v2/repository/index", json={}, timeout=30).json()
        reasons = {entry["name"]: entry.get("reason", "") for entry in index}
        if all(f"on {nodes} other node(s)" in reasons.get(name, "") for name in names):
            return
        reason = str(reasons.get(names[0]))
        time.sleep(0.25)
    raise RuntimeError(f"the router never saw {nodes} nodes with every model: {reason}")


NODES = ("n1", "n2", "n3")


def routing(
    trace: list[Request], names: list[str], package: Path, config: Path, seed: int
) -> dict[str, Outcome]:
    """The trace replayed through the router of a fleet, then to lone nodes at random."""
    outcomes = {}
    for fleet in (True, False):
        with ExitStack() as stack:
            url = stack.enter_context(EtcdCluster(1)).url if fleet else None
            nodes = {
                name: stack.enter_context(
                    running(f"node {name}", node(name, [package], url, config))
                )
                for name in NODES
            }
            if url is not None:
                r = stack.enter_context(running("router", router(url)))
                wait_fleet(r.url, names, len(nodes))
                targets = {"router": r.url}
            else:
                targets = {name: runtime.url for name, runtime in nodes.items()}
            print(f"replaying {len(trace)} requests to {', '.join(targets)} ...", file=sys.stderr)
            outcome = asyncio.run(replay(trace, targets, seed))
            pages = [runtime.metrics() for runtime in nodes.values()]
            outcome.cold_starts = sum(total(page, "omni_model_cold_starts_total") for page in pages)
            starts = sum(total(page, "omni_model_load_duration_seconds_count") for page in pages)
            seconds = sum(total(page, "omni_model_load_duration_seconds_sum") for page in pages)
            outcome.start_seconds = seconds / max(starts, 1)
        outcomes["fleet: all to the router" if fleet else "alone: a node at random"] = outcome
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def print_routing(outcomes: dict[str, Outcome], requests: int, slo: float) -> None:
    print(
        f"{'run':<26}{'requests':>9}{'errors':>7}{'cold starts':>12}{'start s':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{f'≤{slo * 1000:.0f} ms':>9}  served by"
    )
    for label, o in outcomes.items():
        within = sum(1 for latency in o.latencies if latency <= slo) / requests
        served = " ".join(f"{node}:{count}" for node, count in sorted(o.served.items()))
        print(
            f"{label:<26}{requests:>9}{o.errors:>7}{o.cold_starts:>12.0f}{o.start_seconds:>8.2f}"
            f"{percentile(o.latencies, 0.5) * 1e3:>9.1f}{percentile(o.latencies, 0.99) * 1e3:>9.1f}"
            f"{within:>9.1%}  {served}"
        )
    for label, o in outcomes.items():
        notes = [f"sent at most {o.lag * 1e3:.0f} ms late"]
        if o.off_route:
            notes.append(f"{o.off_route} answers without Omni-Route router,NODE")
        print(f"  {label}: {'; '.join(notes)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrk-seconds", type=float, default=5.0, help="each wrk row (5)")
    parser.add_argument("--seconds", type=float, default=60.0, help="the trace's length (60)")
    parser.add_argument("--models", type=int, default=20, help="models in the trace (20)")
    parser.add_argument("--rate", type=float, default=2.0, help="Zipf requests per second (2)")
    parser.add_argument("--load-seconds", type=float, default=0.3, help="each load (0.3)")
    parser.add_argument("--idle-timeout", type=float, default=10.0, help="seconds (10)")
    parser.add_argument("--slo", type=float, default=0.5, help="seconds (0.5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 s wrk rows, a 30 s trace")
    parser.add_argument("--skip-hop", action="store_true", help="only the routing table")
    args = parser.parse_args()
    if args.quick:
        args.wrk_seconds, args.seconds = 2.0, 30.0
    if shutil.which("wrk") is None:
        print("bench/fleet.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    started = time.monotonic()

    hop_rows = [] if args.skip_hop else hop(args.wrk_seconds)

    root = Path(tempfile.mkdtemp(prefix="omni-bench-fleet-"))
    root.chmod(0o755)
    names = [f"@fleet/m{i:02d}" for i in range(args.models)]
    package = write_package(root, names, args.load_seconds)
    config = root / "omni.toml"
    write_config(config, names, args.idle_timeout)
    trace = make_trace(names, args.seconds, args.rate, args.seed)
    try:
        outcomes = routing(trace, names, package, config, args.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if hop_rows:
        print(f"\nThe cost of one hop: {MODEL}, wrk 1 thread, {args.wrk_seconds:.0f} s per row")
        print_hop(hop_rows)
    counts = Counter(request.model for request in trace)
    busiest, quietest = max(counts[n] for n in names), min(counts[n] for n in names)
    print(
        f"\nModel-aware routing vs random: {len(trace)} requests over {args.seconds:.0f} s for "
        f"{args.models} models (the busiest {busiest}, the quietest {quietest}), "
        f"3 nodes; load {args.load_seconds:g} s, idle_timeout {args.idle_timeout:g} s, "
        f"max_replicas 1"
    )
    print_routing(outcomes, len(trace), args.slo)
    minutes = (time.monotonic() - started) / 60
    print(f"\n(cpu count {os.cpu_count()}, one run, {minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
