"""The fleet on a network of its own, as on separate machines: each etcd member, node and
router in a network namespace with its own address on one bridge (``tests/e2e/netns.py``),
every one of them on the same port of its own address. Any node answers any model; losing one
etcd member changes nothing; with no etcd at all the fleet routes on its last view, and its
nodes are registered again once etcd is back; a node killed or cut off the network costs no
request. Root only: skipped elsewhere."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.netns import Namespace, Network, NetworkUnavailable, unavailable
from tests.e2e.runtime import RunningRuntime, start
from tests.fleet_etcd import EtcdCluster, requires_etcd

pytestmark = [
    requires_etcd,
    pytest.mark.skipif(unavailable() is not None, reason=f"no test network: {unavailable()}"),
]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "packages"
ECHO = FIXTURES / "echo-models"
STREAM = FIXTURES / "stream-models"
PORT = 8000  # every runtime listens on this port of its own namespace's address
NODES = "/omni/nodes/"
TTL = 10  # seconds: a node's lease (fleet/membership.py)
REPORT_TTL = 2.0  # seconds a load report stays good (fleet/peers.py)

# Which node serves which packages, and so which models; "router" serves none.
PACKAGES = {"n1": (ECHO, STREAM), "n2": (ECHO,), "n3": (STREAM,)}
SERVERS = {"@test/echo": {"n1", "n2"}, "@test/words": {"n1", "n3"}}
BODIES: dict[str, dict[str, Any]] = {
    "@test/echo": {"text": "hi"},
    "@test/words": {"prompt": "one two", "max_tokens": 2},
    "@test/async-words": {"prompt": "one two", "max_tokens": 2},
}
FROM_THE_CATALOG = r"serving model '@test/async-words' from the catalog"
WARM_ECHO = '[models."@test/echo".scaling]\nmin_replicas = 1\n'


@dataclass
class Fleet:
    """Three etcd members, three nodes and a router, each in its namespace."""

    net: Network
    etcd: EtcdCluster
    config: Path  # keeps @test/echo warm on the nodes that are given it
    spaces: dict[str, Namespace]
    runtimes: dict[str, RunningRuntime] = field(default_factory=dict)
    grpc: str = ""  # n3's gRPC address

    def url(self, name: str) -> str:
        return self.runtimes[name].url

    def node(
        self, name: str, *paths: Path, extra: list[str] | None = None
    ) -> AbstractContextManager[RunningRuntime]:
        """``omni-runtime serve`` as node ``name``, in its namespace, on its address."""
        return start(self._command(name, "serve", *map(str, paths), "--shared-env", *(extra or [])))

    def router(self, name: str) -> AbstractContextManager[RunningRuntime]:
        return start(self._command(name, "route"))

    def _command(self, name: str, verb: str, *args: str) -> list[str]:
        space = self.spaces[name]
        url = f"http://{space.address}:{PORT}"
        return space.exec([
            sys.executable, "-m", "omni_runtime.cli", verb, *args,
            "--host", space.address, "--port", str(PORT), "--advertise", url,
            "--fleet", self.etcd.url, "--node-name", name,
        ])  # fmt: skip

    def catalog(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``omni-runtime catalog ARGS`` from the test's own namespace, through every member."""
        command = [sys.executable, "-m", "omni_runtime.cli", "catalog", *args]
        return subprocess.run(
            [*command, "--fleet", self.etcd.url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def registered(self) -> dict[str, dict[str, Any]]:
        """The node records in etcd, by node name."""
        return {
            key.removeprefix(NODES): json.loads(value)
            for key, value in self.etcd.keys(NODES).items()
        }


def ask(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(f"/ai/run/{model}", json=BODIES[model])


def wait_routable(client: httpx.Client, model: str, timeout: float = 60.0) -> httpx.Response:
    """Ask for ``model`` until some node answers it (nodes find one another through etcd,
    then their reports arrive twice a second)."""
    deadline = time.monotonic() + timeout
    while True:
        response = ask(client, model)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.25)


def wait_served_by(client: httpx.Client, model: str, node: str, timeout: float = 30.0) -> None:
    """Ask for ``model`` until ``node`` answers one (so it is warm and routed to)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        answer = ask(client, model)
        seen.add(f"{answer.status_code} {answer.headers.get('omni-node')}")
        if answer.status_code == 200 and answer.headers["omni-node"] == node:
            return
        time.sleep(0.1)
    raise AssertionError(f"node {node} answered no {model} in {timeout:g}s (answers: {seen})")


@dataclass(frozen=True)
class Answer:
    at: float  # time.monotonic() when it arrived
    took: float  # seconds since it was sent
    status: int
    node: str
    route: str
    text: str


class Load:
    """``clients`` threads asking ``model`` in a loop, each in turn through ``urls``, every
    answer kept (a transport error as status 0)."""

    def __init__(self, urls: list[str], model: str, clients: int = 3, timeout: float = 30.0):
        self.urls = urls
        self.model = model
        self.timeout = timeout
        self.answers: list[Answer] = []
        self.started = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, offset: int) -> None:
        clients = [httpx.Client(base_url=url, timeout=self.timeout) for url in self.urls]
        turn = offset
        try:
            while not self._stop.is_set():
                client = clients[turn % len(clients)]
                turn += 1
                sent = time.monotonic()
                try:
                    response = ask(client, self.model)
                except httpx.HTTPError as exc:
                    now = time.monotonic()
                    self.answers.append(Answer(now, now - sent, 0, "", "", repr(exc)))
                    continue
                now, headers = time.monotonic(), response.headers
                self.answers.append(
                    Answer(
                        now, now - sent, response.status_code, headers.get("omni-node", ""),
                        headers.get("omni-route", ""), response.text[:300],
                    )
                )  # fmt: skip
        finally:
            for client in clients:
                client.close()

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Let each client finish the request it is on, and stop."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The fleet every test shares; a test that stops part of it starts it again."""
    roles = ["e0", "e1", "e2", "n1", "n2", "n3", "router", "kill", "cut", "late"]
    with ExitStack() as stack:
        try:
            net = stack.enter_context(Network())
            spaces = {role: net.add(role) for role in roles}
        except NetworkUnavailable as exc:
            pytest.skip(f"no test network: {exc}")
        members = [spaces[f"e{i}"] for i in range(3)]
        etcd = stack.enter_context(
            EtcdCluster(
                3,
                host=[m.address for m in members],
                data_dir=tmp_path_factory.mktemp("etcd"),
                netns=[m.name for m in members],
            )
        )
        config = tmp_path_factory.mktemp("fleet") / "omni.toml"
        config.write_text(WARM_ECHO)
        fleet = Fleet(net, etcd, config, spaces)
        for name, paths in PACKAGES.items():
            extra = ["--config", str(config)] if ECHO in paths else []
            if name == "n3":
                extra += ["--grpc-port", "0"]
            fleet.runtimes[name] = stack.enter_context(fleet.node(name, *paths, extra=extra))
        fleet.runtimes["router"] = stack.enter_context(fleet.router("router"))
        line = fleet.runtimes["n3"].wait_for_line(r"KServe v2 gRPC at \S+")
        fleet.grpc = line.rsplit(" ", 1)[1]
        for name in fleet.runtimes:  # every node has found every other
            with httpx.Client(base_url=fleet.url(name), timeout=30) as client:
                for model in SERVERS:
                    answer = wait_routable(client, model)
                    assert answer.status_code == 200, f"{name}: {model}: {answer.text}"
        yield fleet


def test_every_node_registers_the_address_of_its_namespace(fleet: Fleet) -> None:
    records = fleet.registered()
    for name in ("n1", "n2", "n3", "router"):
        assert records[name]["url"] == f"http://{fleet.spaces[name].address}:{PORT}", records
        assert fleet.url(name) == records[name]["url"]


def test_any_node_answers_any_model_across_namespaces(fleet: Fleet) -> None:
    for entry in ("n1", "n2", "n3", "router"):
        with httpx.Client(base_url=fleet.url(entry), timeout=30) as client:
            for model, servers in SERVERS.items():
                answer = wait_routable(client, model)
                assert answer.status_code == 200, f"{entry}: {model}: {answer.text}"
                served = answer.headers["omni-node"]
                assert served in servers, f"{entry}: {model} answered by {served}"
                if served == entry:
                    assert "omni-route" not in answer.headers
                else:  # n2 has no @test/words, n3 no @test/echo, the router nothing
                    assert answer.headers["omni-route"] == f"{entry},{served}"
                result = answer.json()["result"]
                assert result.get("text") == "hi" or result.get("response") == "one two "


def test_losing_one_etcd_member_changes_nothing(fleet: Fleet) -> None:
    etcd = fleet.etcd
    # A node talks to the first member of its fleet URL until that one fails it: lose it
    # under a node that has just joined (and so uses it), while another member leads (a new
    # election would renew every lease, and hide a node that no longer renews its own).
    etcd.move_leader(1)
    targets = [fleet.url(name) for name in ("router", "n2", "n3")]
    everyone = {"n1", "n2", "n3", "router", "late"}
    with fleet.node("late") as late:  # no package of its own: it serves the catalog
        deadline = time.monotonic() + 30
        while set(fleet.registered()) < everyone:
            assert time.monotonic() < deadline, late.last_lines()
            time.sleep(0.2)
        nodes = (late, fleet.runtimes["n2"])  # n2 has no stream-models of its own either
        seen = [len(node.lines) for node in nodes]
        try:
            with Load(targets, "@test/echo") as load:
                etcd.kill(0)
                killed = time.monotonic()
                put = fleet.catalog("put", "@test/async-words", "--package", str(STREAM))
                assert put.returncode == 0, put.stderr
                for node, start in zip(nodes, seen, strict=True):
                    node.wait_for_line(FROM_THE_CATALOG, 30, start)
                    with httpx.Client(base_url=node.url, timeout=30) as client:
                        answer = wait_routable(client, "@test/async-words")
                        assert answer.status_code == 200, answer.text
                # the nodes renew their leases through the members left: no record expires
                time.sleep(max(0.0, killed + TTL + 2 - time.monotonic()))
            assert set(fleet.registered()) >= everyone
            assert len(load.answers) > 20 and not load.failures(), load.failures()[:5]
        finally:
            fleet.catalog("delete", "@test/async-words")
            etcd.restart(0)


def test_with_etcd_gone_the_fleet_routes_on_and_its_nodes_register_again(fleet: Fleet) -> None:
    etcd = fleet.etcd
    n2 = fleet.runtimes["n2"]
    with ExitStack() as stack:
        try:
            for i in range(etcd.size):
                etcd.kill(i)
            # Nothing on a request's path needs etcd: the nodes' last view, their peers'
            # reports. A node that starts meanwhile serves what it has.
            echo = stack.enter_context(Load([fleet.url("router")], "@test/echo", clients=2))
            words = stack.enter_context(
                Load([fleet.url("router"), fleet.url("n2")], "@test/words", clients=2)
            )
            late = stack.enter_context(fleet.node("late", STREAM))
            with httpx.Client(base_url=late.url, timeout=30) as client:
                answer = ask(client, "@test/words")
                assert answer.status_code == 200 and answer.headers["omni-node"] == "late"
            time.sleep(max(0.0, echo.started + 8.0 - time.monotonic()))
            echo.stop()
            words.stop()
            for load in (echo, words):
                assert len(load.answers) > 20 and not load.failures(), load.failures()[:5]
            # both nodes with @test/echo warm still get their share: the view is whole
            assert {a.node for a in echo.answers} == SERVERS["@test/echo"]
            assert {a.node for a in words.answers} <= SERVERS["@test/words"]
        finally:
            etcd.restart_all()
        restarted = time.monotonic()
        # Every node is registered within 15 s (the late one for the first time), and still
        # is once a lease has had time to expire: each renews its lease since etcd came back.
        everyone = {"n1", "n2", "n3", "router", "late"}
        while set(fleet.registered()) < everyone:
            assert time.monotonic() < restarted + 15, fleet.registered()
            time.sleep(0.5)
        time.sleep(max(0.0, restarted + TTL + 2 - time.monotonic()))
        assert set(fleet.registered()) >= everyone
        # and follows the catalog again
        seen = len(n2.lines)
        try:
            put = fleet.catalog("put", "@test/async-words", "--package", str(STREAM))
            assert put.returncode == 0, put.stderr
            n2.wait_for_line(FROM_THE_CATALOG, 30, seen)
        finally:
            fleet.catalog("delete", "@test/async-words")


def test_a_node_killed_under_load_costs_no_request(fleet: Fleet) -> None:
    with fleet.node("kill", ECHO, extra=["--config", str(fleet.config)]) as victim:
        with httpx.Client(base_url=fleet.url("router"), timeout=30) as client:
            wait_served_by(client, "@test/echo", "kill")
        with Load([fleet.url("router")], "@test/echo", clients=4) as load:
            time.sleep(2.0)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            killed = time.monotonic()
            time.sleep(4.0)
    assert not load.failures(), load.failures()[:5]
    before = [a for a in load.answers if a.at < killed]
    assert any(a.node == "kill" for a in before), {a.node for a in before}
    late = [a for a in load.answers if a.at > killed + REPORT_TTL]
    assert len(late) > 10 and not [a for a in late if "kill" in (a.node, *a.route.split(","))]


def test_a_forwarded_stream_arrives_chunk_by_chunk(fleet: Fleet) -> None:
    body = {"prompt": "one two three four", "max_tokens": 8, "delay": 0.1, "stream": True}
    for entry in ("router", "n2"):  # neither runs @test/words
        with httpx.Client(base_url=fleet.url(entry), timeout=30) as client:
            arrived: list[tuple[float, str]] = []
            with client.stream("POST", "/ai/run/@test/words", json=body) as stream:
                assert stream.status_code == 200
                served = stream.headers["omni-node"]
                assert served in SERVERS["@test/words"]
                assert stream.headers["omni-route"] == f"{entry},{served}"
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        arrived.append((time.monotonic(), line))
            events = [line for _, line in arrived]
            assert events[-1] == "data: [DONE]" and len(events) == 9, events
            assert "one" in json.loads(events[0].removeprefix("data: "))["response"]
            # the first word came long before the last (0.1 s between words): not buffered
            assert arrived[-2][0] - arrived[0][0] > 0.4, arrived


def test_grpc_is_routed_across_namespaces(fleet: Fleet) -> None:
    host = fleet.grpc.rpartition(":")[0]
    assert host == fleet.spaces["n3"].address  # it listens on its namespace's address
    client = grpcclient.InferenceServerClient(fleet.grpc)
    try:
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"over grpc"], dtype=np.object_))
        result = client.infer("@test/echo", [text], client_timeout=30)  # n3 has no @test/echo
        assert result.as_numpy("text")[0] == b"over grpc"
        assert client.get_model_metadata("@test/echo").name == "@test/echo"
    finally:
        client.close()


def test_a_node_cut_off_the_network_leaves_the_fleet_and_joins_again(fleet: Fleet) -> None:
    cut = fleet.spaces["cut"]
    with (
        fleet.node("cut", ECHO, extra=["--config", str(fleet.config)]) as node,
        httpx.Client(base_url=fleet.url("router"), timeout=10) as client,
    ):
        wait_served_by(client, "@test/echo", "cut")
        cut.cut()  # no reset, no refusal: its packets are lost
        try:
            lost = time.monotonic()
            time.sleep(REPORT_TTL + 1.0)  # its report went stale: the router knows
            answers = [ask(client, "@test/echo") for _ in range(10)]
            assert [a.status_code for a in answers] == [200] * 10
            assert "cut" not in {a.headers["omni-node"] for a in answers}
            # its lease expires: it leaves the fleet's list of nodes
            while "cut" in fleet.registered():
                assert time.monotonic() < lost + TTL + 5, "its record outlived its lease"
                time.sleep(0.5)
        finally:
            cut.mend()
        # back on the network, it registers again (a dead connection to etcd is noticed
        # within 15 s) and the router sends it work again
        mended = time.monotonic()
        while "cut" not in fleet.registered():
            assert time.monotonic() < mended + 20, node.last_lines()
            time.sleep(0.5)
        wait_served_by(client, "@test/echo", "cut")


def test_a_node_cut_off_the_network_under_load_costs_no_request(fleet: Fleet) -> None:
    cut = fleet.spaces["cut"]
    with fleet.node("cut", ECHO, extra=["--config", str(fleet.config)]):
        with httpx.Client(base_url=fleet.url("router"), timeout=30) as client:
            wait_served_by(client, "@test/echo", "cut")
        with Load([fleet.url("router")], "@test/echo", clients=4, timeout=30) as load:
            time.sleep(1.0)
            cut.cut()
            try:
                time.sleep(10.0)
            finally:
                cut.mend()
            time.sleep(1.0)
    assert not load.failures(), load.failures()[:5]
    # A request sent to it before its reports went stale is tried on another node once they
    # have: it takes the time a report stays good, a connection attempt and a little more.
    slow = sorted(round(a.took, 1) for a in load.answers if a.took > REPORT_TTL + 4)
    assert not slow, f"requests that waited for the lost node: {slow} s"


def test_a_grpc_answer_names_the_node_that_served_it(fleet: Fleet) -> None:
    request = service_pb2.ModelInferRequest(model_name="@test/echo")
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    assert text.name == "text"
    request.raw_input_contents.append(struct.pack("<I", 4) + b"grpc")
    with grpc.insecure_channel(fleet.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, timeout=30)  # n3 has no @test/echo
    metadata = dict(call.initial_metadata()) | dict(call.trailing_metadata())
    assert metadata.get("omni-node") in SERVERS["@test/echo"], metadata
    assert metadata.get("omni-route") == f"n3,{metadata['omni-node']}", metadata
