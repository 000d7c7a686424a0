"""A node's part in the fleet: its store connection, its membership, its peers, and the
directory through which its front ends route (``serve --fleet`` and ``route``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from omni_runtime.config import ConfigError, ServerSettings
from omni_runtime.fleet.catalog import Catalog
from omni_runtime.fleet.follow import CatalogFollower, Discover, Replace
from omni_runtime.fleet.membership import Membership
from omni_runtime.fleet.peers import NodeRecord, Peers
from omni_runtime.fleet.report import node_report
from omni_runtime.fleet.router import FleetDirectory
from omni_runtime.fleet.store import EtcdStore, parse_fleet_url
from omni_runtime.metrics import Metrics
from omni_runtime.scheduler import Controller, ModelDirectory
from omni_runtime.server.fleet_api import FleetRoutes

__all__ = ["FleetNode", "advertised_url"]

log = logging.getLogger("omni.fleet")


def advertised_url(advertise: str | None, host: str, port: int) -> str:
    """The URL peers reach this node at: ``--advertise``, else where it listens."""
    if advertise:
        if not advertise.startswith(("http://", "https://")):
            raise ConfigError(f"--advertise {advertise!r}: give a URL, e.g. http://10.0.0.2:8000")
        return advertise.rstrip("/")
    if host in ("0.0.0.0", "::"):
        raise ConfigError(
            f"listening on {host}: say with --advertise URL where the fleet's peers reach "
            "this node (e.g. http://10.0.0.2:8000)"
        )
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class FleetNode:
    def __init__(
        self,
        fleet_url: str,
        name: str | None,
        zone: str,
        url: str,
        local: ModelDirectory | None,
        settings: ServerSettings,
        metrics: Metrics,
        token: str | None,
    ) -> None:
        self.endpoints = parse_fleet_url(fleet_url)  # ConfigError now, before anything starts
        self.name = name or socket.gethostname()
        self.record = NodeRecord(name=self.name, url=url, zone=zone, started=time.time())
        self.local = local
        # Not connected yet: a store that is away at start is retried in the background (the
        # node serves meanwhile), as it is when it goes away later.
        self.store = EtcdStore(self.endpoints)
        self.peers = Peers(self.store, self.name, token)
        self.directory = FleetDirectory(self.name, zone, local, self.peers, settings, metrics)
        self.membership: Membership | None = None
        self.routes = FleetRoutes(self.report, settings.max_body_size)
        self.follower: CatalogFollower | None = None
        self._following: asyncio.Task[None] | None = None

    def follow_catalog(
        self,
        controller: Controller,
        discover: Discover,
        repository: set[str],
        hide: Callable[[Path], None],
        packages_dir: Path | None,
        replace: Replace | None = None,
    ) -> None:
        """Serve what the fleet's catalog names too, as it changes (``fleet/follow.py``); the
        packages of entries given as pip requirements are written under ``packages_dir`` (None:
        this node builds no environments and serves no such entry)."""
        self.follower = CatalogFollower(
            Catalog(self.store), controller, discover, repository, hide, packages_dir, replace
        )

    def report(self) -> dict[str, object]:
        draining = self.membership.record.draining if self.membership is not None else False
        return node_report(self.local, draining)

    async def start(self) -> None:
        """Join the fleet and follow it; a store that is away is retried in the background."""
        self.membership = Membership(self.store, self.record)
        self.membership.start()
        self.peers.start()
        if self.follower is not None:
            self._following = asyncio.create_task(self.follower.run())

    async def drain(self) -> None:
        if self.membership is not None:
            await self.membership.drain()

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        if self.membership is not None:
            await self.membership.close()
        await self.peers.close()
        await self.directory.close()
        await self.store.close()
