"""``omni-runtime serve``: the node's parts put together, and nothing else.

Discovery and isolation come from ``commands``, the merged configuration from ``config``;
here they are wired to the controller, the batch runner, the HTTP app (``server.app``), the
gRPC service and uvicorn, on a socket bound before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omni_runtime.commands import discover, discoverer, isolation_for
from omni_runtime.config import OmniFile, ServerSettings, command_line_server, node_config
from omni_runtime.isolation import Isolation

if TYPE_CHECKING:
    from grpc.aio import Server as GrpcServer

    from omni_runtime.server.tokens import Tokens

__all__ = ["serve"]

log = logging.getLogger("omni.runtime")


def serve(args: argparse.Namespace) -> int:
    from omni_runtime.server.tokens import Tokens

    started = time.monotonic()
    _raise_descriptor_limit()
    tokens = Tokens.from_environ(os.environ)
    isolation = isolation_for(args)  # before discovery: it runs in a cgroup of its own too
    try:
        return _serve_with(args, isolation, tokens, started)
    finally:
        isolation.close()  # (the controller closes it too when it stops: twice is harmless)


def _serve_with(
    args: argparse.Namespace, isolation: Isolation, tokens: Tokens, started: float
) -> int:
    import uvicorn

    from omni_runtime.batch import AsyncBatchStore, BatchRunner, BatchStore, SqliteBatchStore
    from omni_runtime.metrics import Metrics
    from omni_runtime.scheduler import Controller, ModelDirectory, host_budget
    from omni_runtime.scheduler.checks import check_models, detect_gpus
    from omni_runtime.scheduler.promoted import with_promoted
    from omni_runtime.scheduler.rollout import Rollouts
    from omni_runtime.server.app import OmniApp
    from omni_runtime.server.model_files import ModelFiles
    from omni_runtime.workers import LocalWorkers

    discovery, files = discover(args, isolation)
    rollouts_file = args.state_dir / "rollouts.json"  # versions promoted by rollouts
    given = {spec.name: spec.package_dir for spec in discovery.models}
    discovery.models = asyncio.run(
        with_promoted(discovery.models, rollouts_file, discoverer(args, isolation, files))
    )
    packages = {spec.package_dir for spec in discovery.models}
    packages |= {failure.package_dir for failure in discovery.failures}
    node_settings = node_config(files, packages)
    settings = command_line_server(node_settings.server, {"max_body_size": args.max_body_size})
    scheduler = node_settings.scheduler
    gpus = dict(scheduler.gpus) if scheduler.gpus is not None else detect_gpus()
    check_models(
        discovery.models, scheduler, host_budget(scheduler), node_settings.scheduler_sources, gpus
    )
    for failure in discovery.failures:
        log.error("%s", failure.error)
    _warn_unknown_models(files, {spec.name for spec in discovery.models})
    if not discovery.models and not args.fleet:
        print("omni-runtime: no model could be discovered; nothing to serve", file=sys.stderr)
        return 1

    sock = _listen(args.host, args.port)
    if sock is None:
        return 2
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

    models = ModelDirectory(node)  # all the front ends see of the node
    rollouts = Rollouts(
        node, models, discoverer(args, isolation, files), state_file=rollouts_file, given=given
    )
    fleet = None
    if args.fleet:
        from omni_runtime.fleet.node import FleetNode, advertised_url

        fleet = FleetNode(
            args.fleet, args.node_name, args.zone, advertised_url(args.advertise, host, port),
            models, settings, metrics, tokens.api or tokens.admin,
        )  # fmt: skip
        repository = {spec.name for spec in discovery.models}
        fleet.follow_catalog(
            node,
            discoverer(args, isolation, files),
            repository,
            isolation.hide,
            None if args.shared_env else args.state_dir / "catalog",
            rollouts.replace,
        )
    # Models loaded from the files of a load request (Triton's model control).
    model_files = ModelFiles(
        args.state_dir / "loaded", discoverer(args, isolation, files), node, models, rollouts,
        isolation.hide,
    )  # fmt: skip
    front = fleet.directory if fleet is not None else models  # a fleet routes through its own
    tasks: set[asyncio.Task[None]] = set()
    grpc_servers: list[GrpcServer] = []

    store: BatchStore | AsyncBatchStore
    if fleet is not None:  # the fleet's nodes share one queue, on its etcd (docs/batch.md)
        from omni_runtime.batch.etcd_store import EtcdBatchStore

        store = EtcdBatchStore(fleet.store, fleet.name)
    else:
        store = SqliteBatchStore(args.state_dir / "batch.sqlite3")
    batches = BatchRunner(store, node, settings.batch_retention, metrics)

    async def startup() -> None:
        batches.start()
        if fleet is not None:
            await fleet.start()
        if args.grpc_port is not None:
            from omni_runtime.server.grpc_listen import grpc_authorizer, start_grpc_server

            server, grpc_port = await start_grpc_server(
                front, args.host, args.grpc_port, grpc_authorizer(tokens),
                fleet.name if fleet is not None else None, app.shared_memory, model_files,
            )  # fmt: skip
            grpc_servers.append(server)
            print(f"omni-runtime: KServe v2 gRPC at {args.host}:{grpc_port}", flush=True)
        task = asyncio.create_task(load_then_announce())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def shutdown() -> None:
        await rollouts.stop()  # a rollout in progress is aborted: the current version stays
        if fleet is not None:
            await batches.stop()  # before the store closes: its claims go back to the queue
            await fleet.stop()
        for server in grpc_servers:
            await server.stop(settings.drain_timeout)
        await batches.stop()  # items still running are run again at the next start
        await node.stop()
        app.shared_memory.close()

    app = OmniApp(
        front, on_startup=startup, on_shutdown=shutdown, tokens=tokens, batches=batches,
        node=fleet.name if fleet is not None else None,
        fleet=fleet.routes if fleet is not None else None,
        rollouts=rollouts, files=model_files,
    )  # fmt: skip
    config = uvicorn_config(app, settings, args.log_level)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if fleet is not None:
                await fleet.drain()  # peers stop sending work here
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


def uvicorn_config(app: Any, settings: ServerSettings, log_level: str) -> Any:
    """How uvicorn runs the app: the connection limits of ``server/connection.py``, no access
    log or headers of its own, the runtime's logging."""
    import uvicorn

    from omni_runtime.server.connection import limited_protocol

    return uvicorn.Config(
        app,
        http=limited_protocol(
            settings.max_header_size,
            settings.body_timeout,
            settings.max_connections,
            settings.max_body_size,
        ),
        log_level=log_level,
        access_log=False,
        lifespan="on",
        log_config=None,  # uvicorn logs through the runtime's logging set-up
        # The controller answers what is left at drain_timeout with 503s; uvicorn's own
        # deadline comes later, so it never cuts a request off with a bare 500.
        timeout_graceful_shutdown=int(settings.drain_timeout) + 10,
        server_header=False,
        proxy_headers=False,  # no proxy in front by default; saves a middleware per request
    )


def _listen(host: str, port: int) -> socket.socket | None:
    """A listening socket on ``host:port``, or None once the reason is printed."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        print(f"omni-runtime: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _raise_descriptor_limit() -> None:
    """Open files up to the hard limit: each connection, worker and payload takes some."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    log.debug("open files: at most %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


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
