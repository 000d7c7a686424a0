"""The HTTP route table: what each request line resolves to, and who may call it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from omni_runtime.scheduler import ModelDirectory
from omni_runtime.server.app import OmniApp
from omni_runtime.server.routes import Resolved, Route, RouteTable, Why
from omni_runtime.server.tokens import Access
from tests.runtime.scheduler.test_controller import Node, run, spec


@pytest.fixture
def table() -> Iterator[RouteTable]:
    tables: list[RouteTable] = []

    async def build() -> None:
        node = Node(spec("a"), spec("@cf/b/c"))
        tables.append(OmniApp(ModelDirectory(node.controller)).table)

    run(build)
    yield tables[0]


def resolve(table: RouteTable, method: str, path: str) -> Resolved:
    return table.resolve(method, path)


def name(resolved: Resolved) -> str:
    return getattr(resolved.handler, "__name__", "")


def test_fixed_routes_and_their_access(table: RouteTable) -> None:
    live = resolve(table, "GET", "/v2/health/live")
    assert name(live) == "live" and live.access is Access.OPEN and live.model is None
    assert resolve(table, "GET", "/metrics").access is Access.OPEN
    assert resolve(table, "GET", "/v2").access is Access.API
    assert resolve(table, "POST", "/v2/repository/index").access is Access.ADMIN
    assert resolve(table, "GET", "/ai/batch").access is Access.ADMIN
    wrong = resolve(table, "POST", "/v2/health/live")
    assert wrong.handler is None and wrong.why is Why.METHOD


def test_model_routes_take_names_with_slashes_and_versions(table: RouteTable) -> None:
    infer = resolve(table, "POST", "/v2/models/@cf/b/c/infer")
    assert name(infer) == "infer" and infer.model is not None
    assert infer.model.name == "@cf/b/c" and infer.version is None
    metadata = resolve(table, "GET", "/v2/models/@cf/b/c")
    assert name(metadata) == "model_metadata" and metadata.model is infer.model
    versioned = resolve(table, "POST", "/v2/models/a/versions/3/infer")
    assert versioned.model is not None and versioned.model.name == "a"
    assert versioned.version == "3"
    run_ = resolve(table, "POST", "/ai/run/@cf/b/c")
    assert name(run_) == "run" and run_.access is Access.API
    assert resolve(table, "GET", "/ai/run/a").why is Why.METHOD
    load = resolve(table, "POST", "/v2/repository/models/a/load")
    assert name(load) == "repository_load" and load.access is Access.ADMIN


def test_an_unknown_model_is_named_without_the_routes_suffix(table: RouteTable) -> None:
    infer = resolve(table, "POST", "/v2/models/nope/infer")
    assert infer.why is Why.UNKNOWN_MODEL and infer.name == "nope"
    assert infer.access is Access.API
    load = resolve(table, "POST", "/v2/repository/models/x/y/load")
    assert load.why is Why.UNKNOWN_MODEL and load.name == "x/y"
    assert load.access is Access.ADMIN  # an unknown name never opens an admin route
    assert resolve(table, "POST", "/ai/run/nope").name == "nope"


def test_what_matches_no_route_keeps_the_access_of_its_family(table: RouteTable) -> None:
    assert resolve(table, "GET", "/v2/repository/anything").access is Access.ADMIN
    assert resolve(table, "GET", "/ai/batch/x").access is Access.ADMIN
    nothing = resolve(table, "GET", "/nothing")
    assert nothing.why is Why.NO_ROUTE and nothing.access is Access.API


def test_only_health_and_the_metrics_scrape_are_open() -> None:
    async def build() -> None:
        app = OmniApp(ModelDirectory(Node(spec("a")).controller))
        opened = {(r.method, r.path) for r in _routes(app) if r.access is Access.OPEN}
        assert opened == {
            ("GET", "/v2/health/live"),
            ("GET", "/v2/health/ready"),
            ("GET", "/metrics"),
        }

    run(build)


def test_two_routes_for_one_request_line_are_refused() -> None:
    async def handler(*_: object) -> None: ...

    async def build() -> None:
        directory = ModelDirectory(Node(spec("a")).controller)
        twice = [Route("GET", "/x", handler, Access.API), Route("GET", "/x", handler, Access.OPEN)]
        with pytest.raises(ValueError, match="two routes for GET /x"):
            RouteTable(twice, directory)

    run(build)


def _routes(app: OmniApp) -> list[Route]:
    from omni_runtime.server.app import route_list

    return route_list(app, *app.surfaces)


def test_region_routes_take_any_name_and_need_the_api_token(table: RouteTable) -> None:
    register = resolve(table, "POST", "/v2/systemsharedmemory/region/in/put/register")
    assert name(register) == "register" and register.access is Access.API
    assert register.model is None  # a region's name is no model's
    status = resolve(table, "GET", "/v2/systemsharedmemory/region/a/status")
    assert name(status) == "region_status" and status.access is Access.API
    assert name(resolve(table, "POST", "/v2/systemsharedmemory/region/a/unregister")) == (
        "unregister"
    )
    assert resolve(table, "GET", "/v2/systemsharedmemory/region/a/register").why is Why.METHOD
    assert resolve(table, "POST", "/v2/systemsharedmemory/region//register").why is Why.NO_ROUTE
    cuda = resolve(table, "POST", "/v2/cudasharedmemory/region/g/register")
    assert name(cuda) == "cuda_register" and cuda.access is Access.API
