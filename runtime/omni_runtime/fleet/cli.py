"""``omni-runtime route`` (a node that serves no model and routes every request to the
fleet) and ``omni-runtime catalog`` (the fleet's catalog)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from omni_runtime.config import ServerSettings

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    if args.command == "catalog":
        from omni_runtime.fleet.catalog import catalog_command

        return int(asyncio.run(catalog_command(args)))
    return _route(args)


def _route(args: argparse.Namespace) -> int:
    import uvicorn

    from omni_runtime.batch.etcd_store import EtcdBatchStore
    from omni_runtime.batch.runner import BatchRunner
    from omni_runtime.fleet.node import FleetNode, advertised_url
    from omni_runtime.metrics import Metrics
    from omni_runtime.serve import _listen, uvicorn_config
    from omni_runtime.server.app import OmniApp
    from omni_runtime.server.tokens import Tokens

    tokens = Tokens.from_environ(os.environ)
    settings = ServerSettings()
    sock = _listen(args.host, args.port)
    if sock is None:
        return 2
    host, port = sock.getsockname()[:2]
    url = advertised_url(args.advertise, host, port)
    metrics = Metrics()
    node = FleetNode(
        args.fleet, args.node_name, args.zone, url, None, settings, metrics,
        tokens.api or tokens.admin,
    )  # fmt: skip
    # Batches submitted here join the fleet's queue, which the serving nodes run.
    batches = BatchRunner(
        EtcdBatchStore(node.store, node.name), None, settings.batch_retention, metrics
    )

    async def startup() -> None:
        batches.start()
        await node.start()
        print(f"omni-runtime: routing for the fleet at http://{host}:{port}", flush=True)

    async def shutdown() -> None:
        await batches.stop()
        await node.stop()

    app = OmniApp(
        node.directory, on_startup=startup, on_shutdown=shutdown, tokens=tokens,
        batches=batches, node=node.name, fleet=node.routes,
    )  # fmt: skip
    config = uvicorn_config(app, settings, args.log_level)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        print("omni-runtime: stopped", file=sys.stderr)
        return 130
    return 0
