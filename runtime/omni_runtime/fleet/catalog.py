"""The fleet's catalog: which models the fleet serves, one record per model under
``/omni/catalog/<model>``, and the ``omni-runtime catalog put|get|list|delete`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from omni_runtime.config import VERSION_PATTERN, ConfigError
from omni_runtime.fleet.store import (
    CATALOG_PREFIX,
    URL_FORM,
    EtcdStore,
    Store,
    StoreUnavailable,
    catalog_key,
    parse_fleet_url,
)
from omni_sdk import Resources, Scaling

__all__ = ["Catalog", "CatalogEntry", "CatalogError", "catalog_command", "requirement_of"]

log = logging.getLogger("omni.fleet")


class CatalogError(ValueError):
    """A catalog record or entry is wrong; the message names the key or field."""


def _problems(exc: ValidationError, parent: str = "") -> str:
    """What ``exc`` found wrong, one clause per field: ``field 'cpus': ... (got 0)``."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (parent, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'")
        elif error["type"] == "value_error" and error["loc"][:1] in (("resources",), ("scaling",)):
            problems.append(message)  # already names its field (see _checked)
        elif where:
            got = repr(error.get("input"))
            problems.append(
                f"field '{where}': {message}" + ("" if f"got {got}" in message else f" (got {got})")
            )
        else:
            problems.append(message)
    return "; ".join(problems)


_CHECKED: dict[str, type[BaseModel]] = {"resources": Resources, "scaling": Scaling}


def _checked(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """``value`` when it is right for the model its field stands for (Resources, Scaling)."""
    model = _CHECKED[info.field_name or ""]
    try:
        model.model_validate(value)
    except ValidationError as exc:
        problems = _problems(exc, parent=info.field_name or "")
        if any(error["type"] == "extra_forbidden" for error in exc.errors()):
            problems += f" (allowed in {info.field_name}: {', '.join(model.model_fields)})"
        raise ValueError(problems) from None
    return value


class CatalogEntry(BaseModel):
    """One model of the fleet's catalog: where its package comes from and how it runs.

    ``resources`` and ``scaling`` hold only what they override of the engine's own
    (``{"memory": "4GiB"}``), as a model's table in omni.toml does.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the model's name, as clients call it")
    package: str = Field(
        min_length=1, description="a directory every node can read, or a pip requirement"
    )
    version: str | None = Field(
        default=None,
        max_length=64,
        pattern=VERSION_PATTERN.pattern,
        description="the model's version (default: its package's)",
    )
    resources: dict[str, Any] = Field(default_factory=dict, description="omni_sdk.Resources")
    scaling: dict[str, Any] = Field(default_factory=dict, description="omni_sdk.Scaling")
    updated: float = Field(default_factory=time.time, description="when it was put (time.time())")

    _resources_and_scaling = field_validator("resources", "scaling")(_checked)

    @field_validator("package")
    @classmethod
    def _package_source(cls, value: str) -> str:
        if value.startswith("/"):
            return value
        try:
            Requirement(value)
        except InvalidRequirement as exc:
            why = str(exc).splitlines()[0]  # packaging adds the text and a caret below
            raise ValueError(
                f"neither an absolute package directory nor a pip requirement ({why})"
            ) from None
        return value

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> CatalogEntry:
        """The record stored for model ``name``; ``CatalogError`` naming its key when it is
        not a catalog entry (or names another model)."""
        try:
            entry = cls.model_validate_json(data)
        except ValidationError as exc:
            raise CatalogError(
                f"{catalog_key(name)}: not a catalog entry ({_problems(exc)}); "
                f"put the model again with 'omni-runtime catalog put'"
            ) from None
        if entry.name != name:
            raise CatalogError(f"{catalog_key(name)}: the record names model {entry.name!r}")
        return entry


def requirement_of(package: str) -> Requirement | None:
    """The pip requirement an entry's ``package`` is, or None for a directory (an absolute
    path)."""
    return None if package.startswith("/") else Requirement(package)


class Catalog:
    """The catalog kept in a ``Store``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def put(self, entry: CatalogEntry) -> CatalogEntry:
        """Store ``entry``, stamped with the time now; returns what was stored."""
        entry = entry.model_copy(update={"updated": time.time()})
        await self._store.put(catalog_key(entry.name), entry.to_json())
        return entry

    async def get(self, name: str) -> CatalogEntry | None:
        """Model ``name``'s entry, or None; ``CatalogError`` when its record is corrupt."""
        data = await self._store.get(catalog_key(name))
        return None if data is None else CatalogEntry.from_json(name, data)

    async def entries(self) -> dict[str, CatalogEntry]:
        """Every entry by model name; a corrupt record is logged and left out."""
        return _entries(await self._store.items(CATALOG_PREFIX))

    async def delete(self, name: str) -> bool:
        """Remove model ``name``; False when it was not there."""
        return await self._store.delete(catalog_key(name))

    async def watch(self) -> AsyncIterator[dict[str, CatalogEntry]]:
        """The whole catalog now, then again after every change (an outage of the store is
        waited out, never raised); a corrupt record is logged and left out."""
        catalog: dict[str, CatalogEntry] = {}
        async for events in self._store.watch(CATALOG_PREFIX):
            for event in events:
                name = event.key.removeprefix(CATALOG_PREFIX)
                catalog.pop(name, None)
                if event.value is not None:
                    catalog.update(_entries({event.key: event.value}))
            yield dict(sorted(catalog.items()))


def _entries(records: dict[str, bytes]) -> dict[str, CatalogEntry]:
    """The entries ``records`` (key -> JSON) hold, by model name; the corrupt ones are logged
    and left out."""
    entries = {}
    for key, data in sorted(records.items()):
        name = key.removeprefix(CATALOG_PREFIX)
        try:
            entries[name] = CatalogEntry.from_json(name, data)
        except CatalogError as exc:
            log.warning("catalog: %s; the model is left out", exc)
    return entries


# -- omni-runtime catalog -------------------------------------------------------------------


EXAMPLE = """e.g. '{"memory": "4GiB"}'"""


def _json_option(option: str, value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{option}: not JSON ({exc}); {EXAMPLE}") from None
    if not isinstance(parsed, dict):
        raise CatalogError(f"{option}: a JSON object is needed, {EXAMPLE}")
    return parsed


def _entry(args: argparse.Namespace) -> CatalogEntry:
    """The entry ``catalog put`` was given; ``CatalogError`` naming the option or field."""
    fields = {
        "name": args.name,
        "package": args.package,
        "version": getattr(args, "model_version", None),
        "resources": _json_option("--resources", getattr(args, "resources", None)),
        "scaling": _json_option("--scaling", getattr(args, "scaling", None)),
    }
    try:
        return CatalogEntry(**fields)
    except ValidationError as exc:
        raise CatalogError(f"model {args.name!r}: {_problems(exc)}") from None


def _table(entries: dict[str, CatalogEntry]) -> str:
    rows = [("MODEL", "VERSION", "PACKAGE")]
    rows += [(e.name, e.version or "-", e.package) for e in entries.values()]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(
        f"{name:<{widths[0]}}  {version:<{widths[1]}}  {package}" for name, version, package in rows
    )


async def catalog_command(args: argparse.Namespace) -> int:
    """``omni-runtime catalog put|get|list|delete --fleet etcd://...``: edit the fleet's
    catalog. 0: done; 1: refused (a bad entry, a model that is not there); 2: no store."""
    command = args.catalog_command
    prefix = f"omni-runtime catalog {command}"
    try:
        entry = _entry(args) if command == "put" else None
        if not getattr(args, "fleet", None):
            raise ConfigError(f"--fleet is needed (the catalog's store, {URL_FORM})")
        endpoints = parse_fleet_url(args.fleet)
    except CatalogError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 2
    store = None
    try:
        store = await EtcdStore.connect(endpoints)
        return await _run(Catalog(store), command, args.name, entry, prefix)
    except StoreUnavailable as exc:
        print(f"{prefix}: {' '.join(str(exc).split())}", file=sys.stderr)  # on one line
        return 2
    finally:
        if store is not None:
            await store.close()


async def _run(
    catalog: Catalog, command: str, name: str | None, entry: CatalogEntry | None, prefix: str
) -> int:
    if command == "list":
        print(_table(await catalog.entries()))
        return 0
    if command == "put" and entry is not None:
        stored = await catalog.put(entry)
        print(json.dumps(stored.model_dump(), indent=2))
        return 0
    if name is None:
        print(f"{prefix}: name the model", file=sys.stderr)
        return 1
    if command == "get":
        try:
            found = await catalog.get(name)
        except CatalogError as exc:
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 1
        if found is None:
            print(f"{prefix}: model {name!r} is not in the catalog", file=sys.stderr)
            return 1
        print(json.dumps(found.model_dump(), indent=2))
        return 0
    if command == "delete":
        if not await catalog.delete(name):
            print(f"{prefix}: model {name!r} is not in the catalog", file=sys.stderr)
            return 1
        print(f"deleted {name}")
        return 0
    print(f"{prefix}: unknown command (put, get, list or delete)", file=sys.stderr)
    return 2
