"""Serving what the fleet's catalog names, as it changes, without a restart.

Each node follows ``/omni/catalog/`` (a watch): a model put into the catalog is discovered
from its package (a directory every node can read) and served here, scaled to zero until a
request comes; a changed entry replaces it (requests in flight finish first); a deleted one
stops being served. The models of the node's own repository (the paths ``serve`` was given)
stay as they are: a catalog entry of the same name is ignored on this node, with a warning.
A package that cannot be discovered is logged with its reason and tried again at its next
change; the node serves everything else meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from omni_runtime.discovery import Discovery, ModelSpec
from omni_runtime.fleet.catalog import CatalogEntry
from omni_runtime.scheduler import Controller
from omni_sdk import Resources, Scaling

__all__ = ["CatalogFollower"]

log = logging.getLogger("omni.fleet")

Discover = Callable[[list[Path]], Awaitable[Discovery]]


class _Catalog(Protocol):
    def watch(self) -> AsyncIterator[dict[str, CatalogEntry]]: ...


class CatalogFollower:
    def __init__(
        self,
        catalog: _Catalog,
        controller: Controller,
        discover: Discover,
        repository: set[str],
        hide: Callable[[Path], None] = lambda path: None,
    ) -> None:
        self.catalog = catalog
        self.controller = controller
        self.discover = discover
        self.repository = repository  # served from the node's own paths: left alone
        self.hide = hide  # keeps a new package out of every other model's sandbox
        self.served: dict[str, CatalogEntry] = {}
        self._ignored: set[str] = set()

    async def run(self) -> None:
        async for entries in self.catalog.watch():
            try:
                await self.apply(entries)
            except Exception:  # one bad entry must not stop the node following the rest
                log.exception("fleet: applying the catalog failed; the next change retries")

    async def apply(self, entries: dict[str, CatalogEntry]) -> None:
        for name in list(self.served):
            if name not in entries:
                log.info("fleet: model '%s' left the catalog; no longer served here", name)
                await self.controller.remove(name, "removed from the fleet's catalog")
                del self.served[name]
        for name, entry in sorted(entries.items()):
            if name in self.repository:
                if name not in self._ignored:
                    log.warning("fleet: model '%s' is in the catalog and in this node's own "
                                "repository; this node serves its own", name)  # fmt: skip
                    self._ignored.add(name)
                continue
            if _same(self.served.get(name), entry):
                continue
            spec = await self._spec(entry)
            if spec is None:
                continue
            if name in self.served:
                await self.controller.remove(name, "its catalog entry changed")
                del self.served[name]
            self.controller.add(spec)
            self.served[name] = entry
            version = f", version {entry.version}" if entry.version else ""
            log.info("fleet: serving model '%s' from the catalog (package %s%s)", name,
                     entry.package, version)  # fmt: skip

    async def _spec(self, entry: CatalogEntry) -> ModelSpec | None:
        path = Path(entry.package)
        if not path.is_absolute() or not (path / "pyproject.toml").is_file():
            log.error("fleet: model '%s': its package %r is not a package directory on this "
                      "node (an absolute path with a pyproject.toml); not served here",
                      entry.name, entry.package)  # fmt: skip
            return None
        self.hide(path)
        discovery = await self.discover([path])
        for failure in discovery.failures:
            log.error("fleet: model '%s': %s", entry.name, failure.error)
        spec = next((s for s in discovery.models if s.name == entry.name), None)
        if spec is None:
            found = ", ".join(s.name for s in discovery.models) or "none"
            if not discovery.failures:
                log.error("fleet: model '%s': its package %s registers no such model "
                          "(it registers %s)", entry.name, path, found)  # fmt: skip
            return None
        return dataclasses.replace(
            spec,
            resources=Resources.model_validate(spec.resources.model_dump() | entry.resources),
            scaling=Scaling.model_validate(spec.scaling.model_dump() | entry.scaling),
        )


def _same(served: CatalogEntry | None, entry: CatalogEntry) -> bool:
    if served is None:
        return False
    keys = ("package", "version", "resources", "scaling")
    return all(getattr(served, k) == getattr(entry, k) for k in keys)
