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

    from omni_runtime.fleet.node import FleetNode, advertised_url
    from omni_runtime.metrics import Metrics
    from omni_runtime.serve import _listen
    from omni_runtime.server.app import OmniApp
    from omni_runtime.server.connection import limited_protocol
    from omni_runtime.server.tokens import Tokens

    tokens = Tokens.from_environ(os.environ)
    settings = ServerSettings()
    sock = _listen(args.host, args.port)
    if sock is None:
        return 2
    host, port = sock.getsockname()[:2]
    url = advertised_url(args.advertise, host, port)
    node = FleetNode(
        args.fleet, args.node_name, args.zone, url, None, settings, Metrics(),
        tokens.api or tokens.admin,
    )  # fmt: skip

    async def startup() -> None:
        await node.start()
        print(f"omni-runtime: routing for the fleet at http://{host}:{port}", flush=True)

    app = OmniApp(
        node.directory, on_startup=startup, on_shutdown=node.stop, tokens=tokens,
        node=node.name, fleet=node.routes,
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        http=limited_protocol(
            settings.max_header_size, settings.body_timeout, settings.max_connections
        ),
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        log_config=None,
        server_header=False,
        proxy_headers=False,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        print("omni-runtime: stopped", file=sys.stderr)
        return 130
    return 0
