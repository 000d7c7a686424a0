"""A fleet on one machine: real etcd, real runtimes that find one another through it, and a
router that serves no model. Any node answers any model; every answer names the node that
served it and the route it took; a node killed with SIGKILL costs no request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.runtime import RunningRuntime, serve, start
from tests.fleet_etcd import EtcdCluster, requires_etcd

pytestmark = requires_etcd

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "packages"
ECHO = FIXTURES / "echo-models"
STREAM = FIXTURES / "stream-models"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster(1) as cluster:
        yield cluster


def node(
    etcd: EtcdCluster, name: str, *paths: Path, extra: list[str] | None = None
) -> AbstractContextManager[RunningRuntime]:
    return serve(
        *paths,
        extra=["--fleet", etcd.url, "--node-name", name, "--shared-env", *(extra or [])],
    )


def router(etcd: EtcdCluster, name: str = "router") -> AbstractContextManager[RunningRuntime]:
    command = [sys.executable, "-m", "omni_runtime.cli", "route", "--port", "0",
               "--fleet", etcd.url, "--node-name", name]  # fmt: skip
    return start(command)


def wait_routable(client: httpx.Client, model: str, timeout: float = 30.0) -> httpx.Response:
    """Ask for ``model`` until some node of the fleet answers it (reports arrive twice a
    second once the nodes found one another)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.post(f"/ai/run/{model}", json={"text": "hi"})
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.25)


def test_any_node_answers_any_model_and_names_the_route(etcd: EtcdCluster) -> None:
    with ExitStack() as stack:
        a = stack.enter_context(node(etcd, "a", STREAM))
        stack.enter_context(node(etcd, "b", ECHO))
        r = stack.enter_context(router(etcd))
        with httpx.Client(base_url=a.url, timeout=30) as client:
            answer = wait_routable(client, "@test/echo")
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"]["text"] == "hi"
            assert answer.headers["omni-node"] == "b"
            assert answer.headers["omni-route"] == "a,b"
            # A model served here stays here.
            words = client.post("/ai/run/@test/words", json={"prompt": "one two", "delay": 0})
            assert words.status_code == 200, words.text
            assert words.headers["omni-node"] == "a" and "omni-route" not in words.headers
        with httpx.Client(base_url=r.url, timeout=30) as client:
            answer = wait_routable(client, "@test/echo")
            assert answer.status_code == 200 and answer.headers["omni-node"] == "b"
            assert answer.headers["omni-route"] == "router,b"
            # KServe v2 JSON, forwarded as the worker takes it
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
            v2 = client.post("/v2/models/@test/echo/infer", json=body)
            assert v2.status_code == 200, v2.text
            assert v2.headers["omni-node"] == "b"
            # metadata of a model this node does not run, from its node's report
            assert client.get("/v2/models/@test/words").json()["name"] == "@test/words"
            # a stream, forwarded chunk by chunk
            with client.stream(
                "POST", "/ai/run/@test/words",
                json={"prompt": "one two three", "delay": 0.01, "stream": True},
            ) as stream:  # fmt: skip
                events = [line for line in stream.iter_lines() if line.startswith("data: ")]
                assert stream.headers["omni-node"] == "a"
            assert events[-1] == "data: [DONE]"
            assert len(events) >= 4, events
            # an unknown model: one clear 404 naming it
            missing = client.post("/ai/run/@test/nope", json={})
            assert missing.status_code == 404 and "@test/nope" in missing.text


def test_grpc_is_routed_too(etcd: EtcdCluster) -> None:
    with ExitStack() as stack:
        stack.enter_context(node(etcd, "g-b", ECHO))
        a = stack.enter_context(node(etcd, "g-a", STREAM, extra=["--grpc-port", "0"]))
        grpc_line = a.wait_for_line(r"KServe v2 gRPC at \S+:(\d+)")
        port = grpc_line.rsplit(":", 1)[1]
        with httpx.Client(base_url=a.url, timeout=30) as client:
            assert wait_routable(client, "@test/echo").status_code == 200
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"over grpc"], dtype=np.object_))
        result = client.infer("@test/echo", [text])
        assert result.as_numpy("text")[0] == b"over grpc"
        # the trailing metadata names the node that served it, as HTTP headers do
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ModelInfer.with_call(
                service_pb2.ModelInferRequest(
                    model_name="@test/echo",
                    inputs=[{"name": "text", "datatype": "BYTES", "shape": [1]}],
                    raw_input_contents=[b"\x04\x00\x00\x00grpc"],
                )
            )
            trailing = dict(call.trailing_metadata())
        assert trailing["omni-node"] == "g-b" and trailing["omni-route"] == "g-a,g-b"


def test_a_decoupled_stream_is_forwarded_chunk_by_chunk(etcd: EtcdCluster) -> None:
    """gRPC ModelStreamInfer on a node without the streaming model: each chunk comes back from
    the node that runs it as its own response."""
    with ExitStack() as stack:
        stack.enter_context(node(etcd, "d-a", STREAM))
        b = stack.enter_context(node(etcd, "d-b", ECHO, extra=["--grpc-port", "0"]))
        port = b.wait_for_line(r"KServe v2 gRPC at \S+:(\d+)").rsplit(":", 1)[1]
        with httpx.Client(base_url=b.url, timeout=30) as client:
            assert wait_routable(client, "@test/words").status_code == 200
        received: list[tuple[object, object]] = []
        done = threading.Event()

        def callback(result: object, error: object) -> None:
            received.append((result, error))
            final = result is not None and result.get_response().parameters.get(  # type: ignore[attr-defined]
                "triton_final_response"
            )
            if error is not None or (final is not None and final.bool_param):
                done.set()

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"one two"], dtype=np.object_))
        tokens = grpcclient.InferInput("max_tokens", [1], "INT64")
        tokens.set_data_from_numpy(np.array([3], dtype=np.int64))
        client.start_stream(callback=callback)
        try:
            client.async_stream_infer(
                "@test/words", [prompt, tokens], request_id="w", enable_empty_final_response=True
            )
            assert done.wait(60), received
        finally:
            client.stop_stream()
            client.close()
        assert [error for _, error in received] == [None] * 4
        words = [r.as_numpy("response")[0] for r, _ in received[:3]]  # type: ignore[attr-defined]
        assert words == [b"one ", b"two ", b"one "]


def test_a_node_killed_under_load_costs_no_request(etcd: EtcdCluster, tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"  # both nodes keep a replica warm
    config.write_text('[models."@test/echo".scaling]\nmin_replicas = 1\n')
    warm = ["--config", str(config)]
    with ExitStack() as stack:
        first = stack.enter_context(node(etcd, "k-1", ECHO, extra=warm))
        second = stack.enter_context(node(etcd, "k-2", ECHO, extra=warm))
        r = stack.enter_context(router(etcd, "k-router"))
        with httpx.Client(base_url=r.url, timeout=30) as client:
            assert wait_routable(client, "@test/echo").status_code == 200
            time.sleep(1.0)  # fresh reports with both warm
        failures: list[str] = []
        served: dict[str, int] = {}
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=r.url, timeout=30) as client:
                while not stop.is_set():
                    answer = client.post("/ai/run/@test/echo", json={"text": "load"})
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text}")
                    else:
                        name = answer.headers["omni-node"]
                        served[name] = served.get(name, 0) + 1

        clients = [threading.Thread(target=load) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(2.0)
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(10)
        killed_at = time.monotonic()
        time.sleep(4.0)
        stop.set()
        for thread in clients:
            thread.join(30)
        assert not failures, failures[:5]
        assert served.get("k-1", 0) > 0 and served.get("k-2", 0) > 0, served
        assert time.monotonic() - killed_at >= 4.0
        assert first.process.poll() is None


def test_the_capacity_report_names_warm_models_and_free_memory(etcd: EtcdCluster) -> None:
    with node(etcd, "c", ECHO) as running:
        httpx.post(f"{running.url}/ai/run/@test/echo", json={"text": "warm"}, timeout=30)
        report = httpx.get(f"{running.url}/fleet/capacity", timeout=10).json()
        assert report["models"]["@test/echo"]["warm"] == 1
        assert report["models"]["@test/echo"]["queue_room"] > 0
        assert report["host_free"] > 0 and report["draining"] is False
        assert json.dumps(report["specs"]["@test/echo"]["inputs"])


def catalog(etcd: EtcdCluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "omni_runtime.cli", "catalog", *args, "--fleet", etcd.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_catalog_change_is_served_by_every_node_without_a_restart(etcd: EtcdCluster) -> None:
    with ExitStack() as stack:
        one = stack.enter_context(node(etcd, "cat-1"))  # no package of its own
        two = stack.enter_context(node(etcd, "cat-2", STREAM))
        put = catalog(etcd, "put", "@test/echo", "--package", str(ECHO))
        assert put.returncode == 0, put.stderr
        for running in (one, two):
            running.wait_for_line(r"serving model '@test/echo' from the catalog", timeout=60)
            # each node serves it itself (directly, not forwarded: it is cold everywhere)
            answer = httpx.post(f"{running.url}/ai/run/@test/echo", json={"text": "c"}, timeout=30)
            assert answer.status_code == 200, answer.text
        # a model in the catalog and in a node's own repository: the node keeps its own
        put = catalog(etcd, "put", "@test/words", "--package", str(STREAM))
        assert put.returncode == 0, put.stderr
        two.wait_for_line(r"'@test/words' is in the catalog and in this node's own", timeout=30)
        gone = catalog(etcd, "delete", "@test/echo")
        assert gone.returncode == 0, gone.stderr
        one.wait_for_line(r"model '@test/echo' left the catalog", timeout=30)
        deadline = time.monotonic() + 10
        while True:  # the peers' reports drop it too, within a report or two
            answer = httpx.post(f"{one.url}/ai/run/@test/echo", json={"text": "c"}, timeout=30)
            if answer.status_code == 404 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answer.status_code == 404, answer.text
        catalog(etcd, "delete", "@test/words")


def test_a_bad_forwarded_call_is_refused_naming_what_is_wrong(etcd: EtcdCluster) -> None:
    with node(etcd, "bad", ECHO) as running:
        url = f"{running.url}/fleet/call/@test/echo"
        for kind, body in ((3, b"\xff\xff\xff\xff{}"), (3, b"\x01"), (99, b"{}"), ("x", b"")):
            answer = httpx.post(url, content=body, headers={"omni-kind": str(kind)}, timeout=30)
            assert answer.status_code == 400, answer.text
            assert "Omni-Kind" in answer.text or "Inference-Header-Content-Length" in answer.text
        missing = httpx.post(f"{running.url}/fleet/call/@test/none", headers={"omni-kind": "4"})
        assert missing.status_code == 404 and "@test/none" in missing.text
        ok = httpx.post(f"{running.url}/ai/run/@test/echo", json={"text": "fine"}, timeout=30)
        assert ok.status_code == 200, ok.text
