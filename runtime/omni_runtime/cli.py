"""``omni-runtime``: serve model packages, list their engines, check the machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from omni_runtime.config import ConfigError, OmniFile, ServerSettings, node_config
from omni_runtime.discovery import (
    Discovery,
    DiscoveryError,
    config_files,
    discover_all,
    find_packages,
)
from omni_runtime.doctor import doctor_report
from omni_runtime.isolation import Isolation
from omni_runtime.isolation.environments import EnvironmentBuilder
from omni_runtime.progress import StatusLine, TerminalProgress
from omni_runtime.scheduler.simulator import TraceError
from omni_sdk import __version__

__all__ = ["main"]

log = logging.getLogger("omni.runtime")


if TYPE_CHECKING:
    from grpc.aio import Server as GrpcServer

    from omni_runtime.server.tokens import Tokens


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
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a model package, or a directory whose subdirectories are packages",
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


def _default_state_dir() -> Path:
    if "OMNI_STATE_DIR" in os.environ:
        return Path(os.environ["OMNI_STATE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "omni"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line that says where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _warn_unknown_models(files: dict[Path, OmniFile], served: set[str]) -> None:
    """A ``[models."NAME"]`` table for a model nobody serves is most likely a typo: say so."""
    for path, omni_file in files.items():
        for name in omni_file.models:
            if name not in served:
                log.warning(
                    '%s: [models."%s"] names no model this runtime serves (it serves %s); '
                    "is the name misspelt?",
                    path, name, ", ".join(sorted(served)) or "none",
                )  # fmt: skip


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
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "models":
            return _models(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "new":
            return _new(args)
        return _doctor(args)
    except (DiscoveryError, ConfigError, TraceError) as exc:
        print(f"omni-runtime: {exc}", file=sys.stderr)
        return 2


def _discover(
    args: argparse.Namespace, isolation: Isolation | None = None
) -> tuple[Discovery, dict[Path, OmniFile]]:
    packages = find_packages(args.paths)
    files = config_files(args.paths, getattr(args, "config", None))
    # Importing a package runs its code: discovery runs in the same sandbox as a worker (and
    # in a cgroup of its own where the runtime has cgroups).
    sandbox = isolation if isolation is not None and isolation.namespaces else None
    # On a terminal a display that updates in place; in a pipe or a log, a line per step.
    with TerminalProgress() if sys.stderr.isatty() else contextlib.nullcontext() as progress:
        builder = None
        if not args.shared_env:
            builder = EnvironmentBuilder(
                args.state_dir / "envs",
                progress=progress,
                source_builds=_repository_server(files, packages).source_builds,
                sandbox=sandbox,
            )
        discovery = asyncio.run(discover_all(packages, files, builder, sandbox, progress=progress))
    return discovery, files


def _isolation(args: argparse.Namespace) -> Isolation:
    packages = find_packages(args.paths)
    files = config_files(args.paths, getattr(args, "config", None))
    return Isolation.detect(
        packages,
        state_dir=args.state_dir,
        masked=_secret_files(files),
        cache_quota=_repository_server(files, packages).cache_quota,
    )


def _repository_server(files: dict[Path, OmniFile], packages: list[Path]) -> ServerSettings:
    """``[server]`` as the repository's omni.toml and ``--config`` set it (never a package's)."""
    settings = ServerSettings()
    for path, omni_file in files.items():
        if omni_file.server is not None and path.parent not in packages:
            fields = omni_file.server.model_fields_set
            settings = settings.model_copy(update={k: getattr(omni_file.server, k) for k in fields})
    return settings


def _raise_descriptor_limit() -> None:
    """Open files up to the hard limit: each connection, worker and payload takes some."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    log.debug("open files: at most %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _secret_files(files: dict[Path, OmniFile]) -> tuple[Path, ...]:
    """Files no model may read: every omni.toml (other models' env) and the token files."""
    token_files = [os.environ.get(f"{n}_FILE") for n in ("OMNI_API_TOKEN", "OMNI_ADMIN_TOKEN")]
    paths = [*files, *(Path(p) for p in token_files if p)]
    return tuple(dict.fromkeys(p.resolve() for p in paths))


def _models(args: argparse.Namespace) -> int:
    isolation = _isolation(args)
    try:
        discovery, _ = _discover(args, isolation)
    finally:
        isolation.close()
    if args.json:
        print(
            json.dumps(
                {
                    "models": [spec.summary() for spec in discovery.models],
                    "failures": [
                        {"package": str(f.package_dir), "error": f.error}
                        for f in discovery.failures
                    ],
                },
                indent=2,
            )
        )
    else:
        rows = [("MODEL", "TASK", "INPUTS", "OUTPUTS")]
        for spec in discovery.models:
            rows.append(
                (
                    spec.name,
                    spec.task or "-",
                    ", ".join(f"{t['name']}:{t['datatype']}{t['shape']}" for t in spec.inputs),
                    ", ".join(f"{t['name']}:{t['datatype']}{t['shape']}" for t in spec.outputs),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print(
                "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
            )
        for failure in discovery.failures:
            print(f"failed: {failure.error}", file=sys.stderr)
    return 1 if discovery.failures and not discovery.models else 0


def _serve(args: argparse.Namespace) -> int:
    from omni_runtime.server.tokens import Tokens

    started = time.monotonic()
    _raise_descriptor_limit()
    tokens = Tokens.from_environ(os.environ)
    isolation = _isolation(args)  # before discovery: it runs in a cgroup of its own too
    try:
        return _serve_with(args, isolation, tokens, started)
    finally:
        isolation.close()  # (the controller closes it too when it stops: twice is harmless)


def _serve_with(
    args: argparse.Namespace, isolation: Isolation, tokens: Tokens, started: float
) -> int:
    import uvicorn

    from omni_runtime.batch import BatchRunner, SqliteBatchStore
    from omni_runtime.metrics import Metrics
    from omni_runtime.scheduler import Controller, host_budget
    from omni_runtime.scheduler.checks import check_models, detect_gpus
    from omni_runtime.server.app import OmniApp
    from omni_runtime.server.connection import limited_protocol
    from omni_runtime.workers import LocalWorkers

    discovery, files = _discover(args, isolation)
    packages = {spec.package_dir for spec in discovery.models}
    packages |= {failure.package_dir for failure in discovery.failures}
    node_settings = node_config(files, packages)
    settings, scheduler = node_settings.server, node_settings.scheduler
    if args.max_body_size:
        try:
            settings = settings.model_copy(
                update={
                    "max_body_size": ServerSettings(max_body_size=args.max_body_size).max_body_size
                }
            )
        except ValueError as exc:
            raise ConfigError(f"--max-body-size: {exc}") from None
    gpus = dict(scheduler.gpus) if scheduler.gpus is not None else detect_gpus()
    check_models(
        discovery.models, scheduler, host_budget(scheduler), node_settings.scheduler_sources, gpus
    )
    for failure in discovery.failures:
        log.error("%s", failure.error)
    _warn_unknown_models(files, {spec.name for spec in discovery.models})
    if not discovery.models:
        print("omni-runtime: no model could be discovered; nothing to serve", file=sys.stderr)
        return 1

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(
            f"omni-runtime: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    sock.listen(2048)
    sock.set_inheritable(False)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    if tokens.api is None and not ipaddress.ip_address(host.partition("%")[0]).is_loopback:
        log.warning(
            "listening on %s without OMNI_API_TOKEN: anyone who can reach it may run "
            "inference%s; set OMNI_API_TOKEN and OMNI_ADMIN_TOKEN (docs/http-api.md)",
            host,
            "" if tokens.admin else " and load or unload models",
        )
    metrics = Metrics()
    node = Controller(
        discovery.models,
        settings,
        metrics,
        LocalWorkers(settings, scheduler, isolation, metrics),
        scheduler,
        gpus,
        failures=discovery.failures,
        env_seconds={path: env.seconds for path, env in discovery.environments.items()},
    )

    async def load_then_announce() -> None:
        await node.start()
        states = [m.state.value for m in node.models.values()]
        ready = states.count("READY")
        failed = len(discovery.failures)
        print(
            f"omni-runtime: serving {ready} of {len(states)} models at {url} "
            f"(ready in {time.monotonic() - started:.1f}s)"
            + (f"; {failed} package(s) failed, see above" if failed else ""),
            flush=True,
        )

    tasks: set[asyncio.Task[None]] = set()
    grpc_servers: list[GrpcServer] = []

    batches = BatchRunner(
        SqliteBatchStore(args.state_dir / "batch.sqlite3"),
        node,
        settings.batch_retention,
        metrics,
    )

    async def startup() -> None:
        batches.start()
        if args.grpc_port is not None:
            from omni_runtime.server.grpc_service import grpc_authorizer, start_grpc_server

            server, grpc_port = await start_grpc_server(
                node, args.host, args.grpc_port, grpc_authorizer(tokens)
            )
            grpc_servers.append(server)
            print(f"omni-runtime: KServe v2 gRPC at {args.host}:{grpc_port}", flush=True)
        task = asyncio.create_task(load_then_announce())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def shutdown() -> None:
        for server in grpc_servers:
            await server.stop(settings.drain_timeout)
        await batches.stop()  # items still running are run again at the next start
        await node.stop()

    app = OmniApp(node, on_startup=startup, on_shutdown=shutdown, tokens=tokens, batches=batches)
    config = uvicorn.Config(
        app,
        http=limited_protocol(
            settings.max_header_size, settings.body_timeout, settings.max_connections
        ),
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        log_config=None,  # uvicorn logs through the runtime's logging set-up
        # The controller answers what is left at drain_timeout with 503s; uvicorn's own
        # deadline comes later, so it never cuts a request off with a bare 500.
        timeout_graceful_shutdown=int(settings.drain_timeout) + 10,
        server_header=False,
        proxy_headers=False,  # no proxy in front by default; saves a middleware per request
    )

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            drain = asyncio.create_task(node.drain())
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    try:
        DrainingServer(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        return 130
    return 0


def template_dir() -> Path:
    """The model template: packaged with the runtime, or in the source tree beside it."""
    for candidate in (
        Path(__file__).resolve().parent / "templates" / "model",
        Path(__file__).resolve().parents[2] / "templates" / "model",
    ):
        if (candidate / "cookiecutter.json").is_file():
            return candidate
    raise ConfigError("the model template is missing from this installation of omni-runtime")


def _new(args: argparse.Namespace) -> int:
    from cookiecutter.exceptions import CookiecutterException, FailedHookException
    from cookiecutter.main import cookiecutter

    logging.getLogger("cookiecutter").setLevel(logging.CRITICAL)  # its errors come as ours
    context = {"engine": args.engine, "model_name": args.name, "task": args.task}
    extra = {k: v for k, v in context.items() if v is not None}
    try:
        package = Path(
            cookiecutter(
                str(template_dir()),
                no_input=args.no_input or not sys.stdin.isatty(),
                output_dir=str(args.output_dir),
                extra_context=extra,
            )
        )
    except FailedHookException:
        return 2  # the template's check said what was wrong, on stderr
    except (CookiecutterException, OSError) as exc:
        print(f"omni-runtime new: {exc}", file=sys.stderr)
        return 2
    print(f"created {package}")
    print(f"next: omni-runtime serve {package}")
    if (package / "tests").is_dir():
        print(f"its tests: cd {package} && pip install -e '.[test]' && pytest")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from omni_runtime.scheduler.simulator import parse_options, plan, read_trace

    options = parse_options(
        gpu_memory=args.gpu_memory,
        max_batch=args.max_batch,
        pcie_gbps=args.pcie_gbps,
        disk_gbps=args.disk_gbps,
        slo=args.slo,
        target=args.target,
        gpus=args.gpus,
        policy=args.policy,
        host_memory=args.host_memory,
        start_seconds=args.start_seconds,
        concurrency=args.concurrency,
        config=args.config,
    )
    trace = read_trace(args.trace)
    print(
        f"omni-runtime simulate: {len(trace)} requests; each run replays them through the "
        "scheduler on a virtual clock",
        file=sys.stderr,
        flush=True,
    )
    # A line per replay: rewritten in place on a terminal, one after another in a pipe.
    status = StatusLine(sys.stderr)
    try:
        result = plan(trace, options, status.update)
    finally:
        status.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    p99 = result["p99_wait_seconds"]
    cpu = result["gpus"] == 0
    gpus = "none: a CPU node" if cpu else str(result["gpus"])
    if result["searched"]:
        gpus += " (fewest meeting the target)"
    rows = [
        ("requests", f"{result['requests']}"),
        ("models", f"{result['models']}"),
        (f"GPUs ({result['policy']})", gpus),
        ("SLO attainment", f"{result['slo_attainment']:.2%} (target {result['target']:.0%})"),
        (
            "one replica per model" if cpu else "one model per GPU",
            "always running" if cpu else f"{result['baseline_gpus']} GPUs",
        ),
        ("  its SLO attainment", f"{result['baseline_slo_attainment']:.2%}"),
        ("GPUs saved", "-" if cpu else f"{result['gpu_saving']:.1%}"),
        (
            "cold starts",
            f"{result['cold_starts']} ({result['cold_starts_per_1000']:g} per 1,000 requests)",
        ),
        ("evictions", f"{result['evictions']}"),
        ("wakes", f"{result['wakes']}"),
        ("refused (429/503)", f"{result['refused']}"),
        ("p99 wait", "never started" if p99 is None else f"{p99:.3f}s"),
    ]
    for label, value in rows:
        print(f"{label:<22} {value}")
    if not result["meets_target"]:
        where = "a CPU node" if cpu else f"{result['gpus']} GPUs"
        print(
            f"omni-runtime: {where} do not meet the target of {result['target']:.0%} "
            "within the SLO",
            file=sys.stderr,
        )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key:<22} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
