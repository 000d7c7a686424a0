"""``omni-runtime``: serve model packages, list their engines, check the machine."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from omni_runtime import commands
from omni_runtime.config import ConfigError
from omni_runtime.discovery import DiscoveryError
from omni_runtime.scheduler.replay import TraceError
from omni_sdk import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omni-runtime", description="Serve many AI models on few GPUs.")
    parser.add_argument("--version", action="version", version=f"omni-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve model packages over HTTP (and gRPC)",
        description="Serve every model the packages register: KServe v2, /ai/run, /v1 and "
        "/metrics on --host:--port. Models start on their first request and scale with "
        "traffic; OMNI_API_TOKEN and OMNI_ADMIN_TOKEN guard the routes (docs/http-api.md).",
    )
    serve.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="a model package, or a directory whose subdirectories are packages (with "
        "--fleet, none is needed: the node serves what the fleet's catalog names)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; set tokens before using a public one)",
    )
    serve.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    serve.add_argument(
        "--grpc-port",
        type=_port,
        metavar="PORT",
        help="also serve KServe v2 over gRPC on this port (0 picks a free one), on --host",
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="an omni.toml applied to every package, before their own (docs/cli.md)",
    )
    serve.add_argument(
        "--max-body-size", metavar="SIZE", help="largest request body, e.g. 64MiB (default)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much the runtime logs (default info)",
    )
    _fleet_options(serve, node=True)

    rollout = commands.add_parser(
        "rollout",
        help="replace a served model by a new version without a failed request",
        description="Start a new version of NAME beside the current one, move traffic to it "
        "(all at once, or --canary percent first, watched for --watch), and stop the old one; "
        "a canary whose errors or latency pass the current version's goes back by itself "
        "(docs/rollout.md). Talks to the runtime at --url with OMNI_ADMIN_TOKEN.",
    )
    rollout.add_argument("name", metavar="NAME", help="the served model, e.g. @cf/org/name")
    what = rollout.add_mutually_exclusive_group(required=True)
    what.add_argument("--package", type=Path, metavar="PATH", help="the new version's package")
    what.add_argument("--to", metavar="VERSION", help="back to a version rolled out before")
    what.add_argument("--status", action="store_true", help="the last rollout's state")
    what.add_argument("--abort", action="store_true", help="abort the rollout in progress")
    rollout.add_argument(
        "--canary", type=float, metavar="PERCENT", help="send this share of requests first"
    )
    rollout.add_argument(
        "--watch", metavar="DURATION", help="how long to watch before all traffic moves (60s)"
    )
    rollout.add_argument(
        "--no-auto-rollback", action="store_true", help="watch, but never go back by itself"
    )
    rollout.add_argument("--no-wait", action="store_true", help="return once it started")
    rollout.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the runtime (http://127.0.0.1:8000)"
    )

    route = commands.add_parser(
        "route",
        help="route requests to the fleet's nodes, serving no model itself",
        description="Accept any request of any protocol and send it to a node of the fleet "
        "with the model warm and room for it (docs/fleet.md).",
    )
    route.add_argument("--host", default="127.0.0.1", help="address to listen on")
    route.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    route.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _fleet_options(route, node=False)

    catalog = commands.add_parser(
        "catalog",
        help="edit the fleet's catalog: which models exist and where their packages come from",
        description="The catalog is shared by every node of the fleet (in etcd); a change "
        "reaches every node at once, without a restart (docs/fleet.md).",
    )
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    put = catalog_commands.add_parser("put", help="add a model, or change it")
    put.add_argument("name", metavar="MODEL", help="the served model name, e.g. @cf/org/name")
    put.add_argument(
        "--package",
        required=True,
        metavar="SOURCE",
        help="a package directory every node can read, or a pip requirement every node can "
        "install (e.g. 'my-model==1.2')",
    )
    put.add_argument("--version", dest="model_version", metavar="VERSION")
    put.add_argument(
        "--resources", metavar="JSON", help='e.g. \'{"memory": "2GiB"}\' (as [model.resources])'
    )
    put.add_argument(
        "--scaling", metavar="JSON", help="e.g. '{\"max_replicas\": 4}' (as [model.scaling])"
    )
    get = catalog_commands.add_parser("get", help="one model's entry, as JSON")
    get.add_argument("name", metavar="MODEL")
    catalog_commands.add_parser("list", help="every model in the catalog")
    delete = catalog_commands.add_parser("delete", help="remove a model from the catalog")
    delete.add_argument("name", metavar="MODEL")
    for command in (put, get, catalog_commands.choices["list"], delete):
        command.add_argument("--fleet", required=True, metavar="etcd://HOST:PORT[,HOST:PORT...]")

    models = commands.add_parser(
        "models",
        help="list the engines that packages register",
        description="Build each package's environment if needed, then list its models with "
        "their task and v2 inputs and outputs.",
    )
    models.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a model package, or a directory whose subdirectories are packages",
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for command in (serve, models):
        command.add_argument(
            "--state-dir",
            type=Path,
            default=_default_state_dir(),
            metavar="DIR",
            help="where environments, model caches and batches live "
            "(default $OMNI_STATE_DIR or ~/.cache/omni)",
        )
        command.add_argument(
            "--shared-env",
            action="store_true",
            help="run every package in the runtime's own environment (no per-package build)",
        )

    doctor = commands.add_parser("doctor", help="what isolation this machine supports")
    doctor.add_argument("--json", action="store_true")

    new = commands.add_parser(
        "new",
        help="start a model package from the template (no cookiecutter needed on your PATH)",
        description="Render Omni's model template into a new package directory. Asks for "
        "what is not given when run on a terminal; otherwise uses the defaults.",
    )
    new.add_argument(
        "--engine",
        choices=["python", "torch", "onnx", "zero-code"],
        help="python: a plain Engine; torch/onnx: a tensor engine with small placeholder "
        "weights or graph; zero-code: an omni.toml and a graph, no Python (default: python); "
        "each serves as soon as it is written",
    )
    new.add_argument("--name", metavar="@ORG/NAME", help="the served model name")
    new.add_argument("--task", help="a Workers AI task name, e.g. text-classification")
    new.add_argument("--output-dir", type=Path, default=Path("."), metavar="DIR")
    new.add_argument("--no-input", action="store_true", help="ask nothing; defaults for the rest")

    simulate = commands.add_parser(
        "simulate",
        help="replay a request trace through the scheduler: how many GPUs does it need?",
        description="Replay TRACE.csv (columns time, model, duration, memory) through the "
        "runtime's own scheduler on a virtual clock with simulated GPUs (or a CPU node: --gpus "
        "0), and report the fewest GPUs that keep --target of requests within --slo, against "
        "one model per GPU. See docs/scheduling.md.",
    )
    simulate.add_argument("trace", type=Path, metavar="TRACE.csv")
    simulate.add_argument(
        "--gpu-memory", metavar="SIZE", default="80GiB", help="memory of one GPU (80GiB)"
    )
    simulate.add_argument(
        "--max-batch",
        metavar="N",
        type=int,
        default=16,
        help="requests a GPU runs at once, each taking its duration (16)",
    )
    simulate.add_argument(
        "--pcie-gbps",
        metavar="X",
        type=float,
        default=25.0,
        help="GB/s host to GPU: waking a parked replica, paging in an over-committed one (25)",
    )
    simulate.add_argument(
        "--disk-gbps",
        metavar="X",
        type=float,
        default=2.0,
        help="GB/s for a fresh start of a GPU replica, loading from disk (2)",
    )
    simulate.add_argument(
        "--slo",
        metavar="DURATION",
        default="2s",
        help="a request meets it when it starts within this of arriving (2s)",
    )
    simulate.add_argument(
        "--target",
        metavar="F",
        type=float,
        default=0.99,
        help="fraction of requests that must meet the SLO (0.99)",
    )
    simulate.add_argument(
        "--gpus",
        metavar="N",
        type=int,
        help="report this many GPUs instead of searching; 0: a CPU node (replicas in host memory)",
    )
    simulate.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="an omni.toml, read as serve reads it: its [scheduler] is the node, its "
        "[models.\"NAME\"] each model's scaling and resources (default: the runtime's defaults)",
    )
    simulate.add_argument(
        "--host-memory",
        metavar="SIZE",
        help="the node's host memory for replicas (default: [scheduler] host_memory, else this "
        "machine's memory less 1 GiB, as serve)",
    )
    simulate.add_argument(
        "--start-seconds",
        metavar="DURATION",
        default="0.2s",
        help="on a CPU node, how long a replica takes to start (0.2s)",
    )
    simulate.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=1,
        help="on a CPU node, requests one replica serves at once (1: a sync engine)",
    )
    simulate.add_argument("--policy", default="omni", choices=["omni", "lru", "static"])
    simulate.add_argument("--json", action="store_true", help="print one JSON object")
    return parser  # fmt: skip


def _fleet_options(command: argparse.ArgumentParser, node: bool) -> None:
    command.add_argument(
        "--fleet",
        metavar="etcd://HOST:PORT[,HOST:PORT...]",
        required=not node,
        help="join the fleet whose catalog and members are in this etcd cluster "
        "(docs/fleet.md); without it the node is alone",
    )
    command.add_argument(
        "--node-name", metavar="NAME", help="this node's name in the fleet (default: hostname)"
    )
    command.add_argument("--zone", metavar="ZONE", default="", help="peers in one zone go first")
    command.add_argument(
        "--advertise",
        metavar="URL",
        help="the URL peers reach this node at (default: http://HOST:PORT as it listens)",
    )


def _default_state_dir() -> Path:
    if "OMNI_STATE_DIR" in os.environ:
        return Path(os.environ["OMNI_STATE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "omni"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line that says where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 (any free one) to 65535, got {port}")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.paths and not args.fleet:
        parser.error("serve needs a PATH (a model package, or a directory of them), or --fleet")
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per call between nodes
    try:
        if args.command == "serve":
            from omni_runtime.serve import serve

            return serve(args)
        if args.command == "models":
            return commands.models(args)
        if args.command == "rollout":
            from omni_runtime.rollout_command import rollout

            return rollout(args)
        if args.command in ("route", "catalog"):
            from omni_runtime.fleet import cli as fleet_cli

            return fleet_cli.run(args)
        if args.command == "simulate":
            return commands.simulate(args)
        if args.command == "new":
            return commands.new(args)
        return commands.doctor(args)
    except (DiscoveryError, ConfigError, TraceError) as exc:
        print(f"omni-runtime: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
