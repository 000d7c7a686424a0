"""Serving what the fleet's catalog names, as it changes, without a restart.

Each node follows ``/omni/catalog/`` (a watch): a model put into the catalog is discovered
from its package (a directory every node can read, or a pip requirement that each node
installs into the model's environment) and served here, scaled to zero until a request
comes; a changed entry replaces it (requests in flight finish first); a deleted one
stops being served. The models of the node's own repository (the paths ``serve`` was given)
stay as they are: a catalog entry of the same name is ignored on this node, with a warning.
A package that cannot be discovered is logged with its reason and tried again at its next
change; the node serves everything else meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from omni_runtime.discovery import Discovery, ModelSpec
from omni_runtime.fleet.catalog import CatalogEntry, requirement_of
from omni_runtime.scheduler import Controller
from omni_sdk import Resources, Scaling

__all__ = ["CatalogFollower", "requirement_package"]

log = logging.getLogger("omni.fleet")

Discover = Callable[[list[Path]], Awaitable[Discovery]]
# Rolls a served model out to a new spec (``Rollouts.replace``); None where it cannot.
Replace = Callable[[str, ModelSpec, str], Awaitable[object | None]]


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
        packages_dir: Path | None = None,
        replace: Replace | None = None,
    ) -> None:
        self.catalog = catalog
        self.controller = controller
        self.discover = discover
        self.repository = repository  # served from the node's own paths: left alone
        self.hide = hide  # keeps a new package out of every other model's sandbox
        # Where the package of an entry given as a pip requirement is written (the state's).
        self.packages_dir = packages_dir
        # A changed entry of another version is rolled out with this (no request fails);
        # without it, or for the same version, the model is stopped and served anew.
        self.replace = replace
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
            replace = self.replace if name in self.served else None
            if replace is not None and await replace(name, spec, entry.package) is not None:
                self.served[name] = entry
                log.info("fleet: rolling model '%s' out to version %s from the catalog "
                         "(package %s)", name, spec.version, entry.package)  # fmt: skip
                continue
            if name in self.served:
                await self.controller.remove(name, "its catalog entry changed")
                del self.served[name]
            self.controller.add(spec)
            self.served[name] = entry
            version = f", version {entry.version}" if entry.version else ""
            log.info("fleet: serving model '%s' from the catalog (package %s%s)", name,
                     entry.package, version)  # fmt: skip

    def _package_dir(self, entry: CatalogEntry) -> Path | None:
        """The package directory ``entry`` names, or the one written here for its requirement."""
        requirement = requirement_of(entry.package)
        if requirement is None:
            path = Path(entry.package)
            if (path / "pyproject.toml").is_file():
                return path
            log.error("fleet: model '%s': its package %r is not a package directory on this "
                      "node (an absolute path with a pyproject.toml); not served here",
                      entry.name, entry.package)  # fmt: skip
            return None
        if self.packages_dir is None:
            log.error("fleet: model '%s': its package is the pip requirement %r, and this "
                      "node builds no model environments to install it in (--shared-env); "
                      "not served here", entry.name, entry.package)  # fmt: skip
            return None
        return requirement_package(self.packages_dir, entry, requirement)

    async def _spec(self, entry: CatalogEntry) -> ModelSpec | None:
        path = self._package_dir(entry)
        if path is None:
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
            version=entry.version or spec.version,
        )


def requirement_package(root: Path, entry: CatalogEntry, requirement: Requirement) -> Path:
    """A model package that serves the installed distribution ``requirement`` names: its one
    dependency, and ``[tool.omni] engines-from`` to find its engines (omni_sdk reads the
    distribution's own ``omni`` entry points). One directory per model, rewritten when the
    requirement changes: its environment is rebuilt then, and kept while it does not."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.name).strip("-.") or "model"
    package = root / f"{slug}-{zlib.crc32(entry.name.encode()):08x}"
    pinned = [s.version for s in requirement.specifier if s.operator in ("==", "===")]
    version = entry.version or (pinned[0] if len(pinned) == 1 else "0")
    text = "\n".join([
        "# Written by omni-runtime from the fleet's catalog; rewritten when the entry changes.",
        "[project]",
        f"name = {json.dumps('omni-catalog-' + slug.lower())}",
        f"version = {json.dumps(version)}",
        f"description = {json.dumps(f'{entry.name} from the fleet catalog')}",
        f"dependencies = [{json.dumps(str(requirement))}]",
        "",
        "[tool.omni]",
        f"engines-from = {json.dumps(canonicalize_name(requirement.name))}",
        "",
    ])  # fmt: skip
    pyproject = package / "pyproject.toml"
    if not pyproject.is_file() or pyproject.read_text() != text:
        package.mkdir(parents=True, exist_ok=True, mode=0o755)
        staged = pyproject.with_suffix(".toml.new")
        staged.write_text(text)
        staged.replace(pyproject)
    return package


def _same(served: CatalogEntry | None, entry: CatalogEntry) -> bool:
    if served is None:
        return False
    keys = ("package", "version", "resources", "scaling")
    return all(getattr(served, k) == getattr(entry, k) for k in keys)
