"""The fleet's catalog: entries, their records in etcd, and ``omni-runtime catalog``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time

import pytest

from omni_runtime.fleet.catalog import Catalog, CatalogEntry, CatalogError, catalog_command
from omni_runtime.fleet.store import EtcdStore, catalog_key
from tests.fleet_etcd import EtcdCluster

MODEL = "@cf/baai/bge-small-en-v1.5"


def _catalog(
    capsys: pytest.CaptureFixture[str], fleet: str, command: str, name: str | None = None, **kw: str
) -> tuple[int, str, str]:
    args = argparse.Namespace(
        catalog_command=command,
        fleet=fleet,
        name=name,
        package=kw.get("package"),
        model_version=kw.get("version"),
        resources=kw.get("resources"),
        scaling=kw.get("scaling"),
    )
    code = asyncio.run(catalog_command(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_an_entry_round_trips_through_json() -> None:
    entry = CatalogEntry(
        name=MODEL, package="/srv/models/minilm", resources={"memory": "4GiB"}, updated=1.5
    )
    assert CatalogEntry.from_json(MODEL, entry.to_json()) == entry
    assert json.loads(entry.to_json()) == {
        "name": MODEL,
        "package": "/srv/models/minilm",
        "version": None,
        "resources": {"memory": "4GiB"},
        "scaling": {},
        "updated": 1.5,
    }


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"resources": {"memory": "lots"}}, "field 'resources.memory'"),
        ({"resources": {"gpus": 1}}, "unknown field 'resources.gpus'"),
        ({"scaling": {"max_replicas": 0}}, "field 'scaling.max_replicas': "),
        ({"colour": "blue"}, "unknown field 'colour'"),
        ({"package": ""}, "field 'package'"),
    ],
)
def test_a_wrong_entry_is_refused_naming_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(CatalogError, match=r"^/omni/catalog/m: not a catalog entry") as error:
        CatalogEntry.from_json("m", json.dumps({"name": "m", "package": "p", **fields}).encode())
    assert named in str(error.value)


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]", b"\xff\xfe", b'{"name": "m"}'])
def test_a_corrupt_record_is_an_error_naming_its_key(data: bytes) -> None:
    with pytest.raises(CatalogError, match=r"^/omni/catalog/a/b@c: not a catalog entry"):
        CatalogEntry.from_json("a/b@c", data)


def test_a_record_under_another_models_key_is_refused() -> None:
    data = CatalogEntry(name="other", package="p").to_json()
    with pytest.raises(CatalogError, match="/omni/catalog/m: the record names model 'other'"):
        CatalogEntry.from_json("m", data)


def test_catalog_put_get_list_delete(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert _catalog(capsys, etcd.url, "list") == (0, "MODEL  VERSION  PACKAGE\n", "")

    before = time.time()
    code, out, err = _catalog(
        capsys,
        etcd.url,
        "put",
        MODEL,
        package="/srv/models/minilm",
        version="1.5",
        resources='{"memory": "4GiB"}',
        scaling='{"max_replicas": 2}',
    )
    assert (code, err) == (0, "")
    stored = json.loads(out)
    assert stored == {
        "name": MODEL,
        "package": "/srv/models/minilm",
        "version": "1.5",
        "resources": {"memory": "4GiB"},
        "scaling": {"max_replicas": 2},
        "updated": stored["updated"],
    }
    assert before <= stored["updated"] <= time.time()
    assert _catalog(capsys, etcd.url, "put", "resnet", package="omni-resnet==2.0")[0] == 0

    code, out, _ = _catalog(capsys, etcd.url, "get", MODEL)
    assert (code, json.loads(out)) == (0, stored)
    code, out, _ = _catalog(capsys, etcd.url, "list")
    assert code == 0
    assert out.splitlines() == [
        "MODEL                       VERSION  PACKAGE",
        f"{MODEL}  1.5      /srv/models/minilm",
        "resnet                      -        omni-resnet==2.0",
    ]

    assert _catalog(capsys, etcd.url, "delete", MODEL) == (0, f"deleted {MODEL}\n", "")
    code, out, err = _catalog(capsys, etcd.url, "get", MODEL)
    assert (code, out) == (1, "")
    assert f"model '{MODEL}' is not in the catalog" in err
    code, out, err = _catalog(capsys, etcd.url, "delete", MODEL)
    assert (code, out) == (1, "")
    assert f"model '{MODEL}' is not in the catalog" in err
    assert _catalog(capsys, etcd.url, "list")[1].splitlines()[1:] == [
        "resnet  -        omni-resnet==2.0"
    ]


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("resources", '{"memory": "lots"}', "field 'resources.memory': expected a size"),
        (
            "resources",
            '{"cpus": 0}',
            "field 'resources.cpus': Input should be greater than 0 (got 0)",
        ),
        (
            "resources",
            '{"gpus": 1}',
            "unknown field 'resources.gpus' (allowed in resources: memory, gpu_memory, cpus)",
        ),
        ("resources", "memory=4GiB", "--resources: not JSON"),
        ("resources", '["4GiB"]', "--resources: a JSON object is needed"),
        ("scaling", '{"min_replicas": -1}', "field 'scaling.min_replicas': "),
    ],
)
def test_a_bad_put_is_refused_naming_the_field(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str], option: str, value: str, named: str
) -> None:
    code, out, err = _catalog(capsys, etcd.url, "put", "m", package="p", **{option: value})
    assert (code, out) == (1, "")
    assert named in err
    assert err.startswith("omni-runtime catalog put: model 'm'") or err.startswith(
        f"omni-runtime catalog put: --{option}"
    )
    assert _catalog(capsys, etcd.url, "list")[1] == "MODEL  VERSION  PACKAGE\n"  # nothing put


def test_an_unreachable_store_exits_2_naming_its_endpoints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))  # bound, not listening: refused
        b.bind(("127.0.0.1", 0))
        fleet = f"etcd://127.0.0.1:{a.getsockname()[1]},127.0.0.1:{b.getsockname()[1]}"
        for command in ("list", "get", "delete"):
            code, out, err = _catalog(capsys, fleet, command, "m")
            assert (code, out) == (2, "")
            assert len(err.splitlines()) == 1
            assert f"tried {fleet.removeprefix('etcd://').replace(',', ', ')}" in err


def test_a_wrong_fleet_url_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _catalog(capsys, "http://127.0.0.1:2379", "list")
    assert (code, out) == (2, "")
    assert "'http://127.0.0.1:2379'" in err and "etcd://HOST:PORT" in err


def test_a_corrupt_record_is_left_out_and_named_in_the_log(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> dict[str, CatalogEntry]:
        store = await EtcdStore.connect(etcd.endpoints)
        try:
            catalog = Catalog(store)
            await catalog.put(CatalogEntry(name="good", package="p"))
            await store.put(catalog_key("bad/one"), b"\x00garbage")
            await store.put(catalog_key("odd"), b'{"name": "odd", "package": "p", "size": 1}')
            with pytest.raises(CatalogError, match="/omni/catalog/bad/one"):
                await catalog.get("bad/one")
            return await catalog.entries()
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="omni.fleet"):
        assert list(asyncio.run(run())) == ["good"]
    logged = caplog.text
    assert "/omni/catalog/bad/one: not a catalog entry" in logged
    assert "/omni/catalog/odd: not a catalog entry (unknown field 'size')" in logged

    assert _catalog(capsys, etcd.url, "list")[1].splitlines()[1:] == ["good   -        p"]
    code, out, err = _catalog(capsys, etcd.url, "get", "odd")
    assert (code, out) == (1, "")
    assert "/omni/catalog/odd: not a catalog entry" in err


def test_watching_the_catalog_gives_it_whole_after_each_change(etcd: EtcdCluster) -> None:
    async def run() -> None:
        store = await EtcdStore.connect(etcd.endpoints)
        catalog = Catalog(store)
        await catalog.put(CatalogEntry(name="a", package="pa"))
        watch = catalog.watch()
        try:
            seen = await asyncio.wait_for(anext(watch), 10)
            assert {n: e.package for n, e in seen.items()} == {"a": "pa"}
            await catalog.put(CatalogEntry(name="b/@c", package="pb"))
            seen = await asyncio.wait_for(anext(watch), 10)
            assert {n: e.package for n, e in seen.items()} == {"a": "pa", "b/@c": "pb"}
            await store.put(catalog_key("a"), b"not json")  # a corrupt record: left out
            seen = await asyncio.wait_for(anext(watch), 10)
            assert {n: e.package for n, e in seen.items()} == {"b/@c": "pb"}
            await catalog.delete("b/@c")
            assert await asyncio.wait_for(anext(watch), 10) == {}
        finally:
            await watch.aclose()
            await store.close()

    asyncio.run(run())
