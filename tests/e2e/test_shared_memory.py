"""Triton's system shared-memory extension through unmodified tritonclient.http and .grpc:
register, status, infer with tensors in regions, unregister; and what a client must not do."""

from __future__ import annotations

import http.client
import json
import os
import re
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient import utils
from tritonclient.utils import InferenceServerException

from tests.e2e.runtime import RunningRuntime, serve

MODEL = '''
import numpy as np
from omni_sdk import Tensor, TensorEngine, hookimpl


class Simple(TensorEngine):
    """As Triton's `simple`: the sum and the difference of two INT32 tensors."""

    name = "simple"
    max_batch_size = 8
    inputs = (Tensor("INPUT0", "INT32", (-1, 16)), Tensor("INPUT1", "INT32", (-1, 16)))
    outputs = (Tensor("OUTPUT0", "INT32", (-1, 16)), Tensor("OUTPUT1", "INT32", (-1, 16)))

    def infer_tensors(self, inputs):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}


class SimpleString(TensorEngine):
    """As Triton's `simple_string`: the same on numbers written as strings."""

    name = "simple_string"
    max_batch_size = 8
    inputs = (Tensor("INPUT0", "BYTES", (-1, 16)), Tensor("INPUT1", "BYTES", (-1, 16)))
    outputs = (Tensor("OUTPUT0", "BYTES", (-1, 16)), Tensor("OUTPUT1", "BYTES", (-1, 16)))

    def infer_tensors(self, inputs):
        a = inputs["INPUT0"].astype(np.int64)
        b = inputs["INPUT1"].astype(np.int64)
        text = np.vectorize(lambda v: str(v).encode(), otypes=[object])
        return {"OUTPUT0": text(a + b), "OUTPUT1": text(a - b)}


@hookimpl
def register_engines(register):
    register(Simple)
    register(SimpleString)
'''

SIXTEEN = 16 * 4  # bytes of one [1, 16] INT32 tensor
IN0 = np.arange(16, dtype=np.int32).reshape(1, 16)
IN1 = np.full((1, 16), 3, dtype=np.int32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shm")
    package = root / "simple"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[project]\nname = "omni-test-simple"\nversion = "0.1.0"\n'
        'dependencies = ["omni-sdk", "numpy"]\n\n[project.entry-points.omni]\n'
        'simple = "omni_test_simple"\n'
    )
    (package / "omni_test_simple.py").write_text(textwrap.dedent(MODEL))
    for path in (root, package, *package.iterdir()):  # the models run as users of their own
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class Runtime:
    def __init__(self, running: RunningRuntime) -> None:
        self.running = running
        self.http = running.host_port
        line = running.wait_for_line(r"KServe v2 gRPC at \S+")
        match = re.search(r"gRPC at (\S+)", line)
        assert match is not None
        self.grpc = match.group(1)


@pytest.fixture(scope="module")
def runtime(repository: Path) -> Iterator[Runtime]:
    with serve(repository, extra=["--grpc-port", "0", "--max-body-size", "64KiB"]) as running:
        yield Runtime(running)


class Objects:
    """Shared-memory objects a test creates (a unique key each), destroyed at its end."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def create(self, name: str, size: int) -> tuple[str, Any]:
        key = f"/omni-test-{uuid.uuid4().hex[:12]}"
        self.handles.append(shm.create_shared_memory_region(name, key, size))
        return key, self.handles[-1]


@pytest.fixture()
def regions() -> Iterator[Objects]:
    objects = Objects()
    yield objects
    for handle in objects.handles:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture()
def clients(runtime: Runtime) -> Iterator[list[Any]]:
    """An HTTP and a gRPC client of ``runtime``."""
    made = [
        httpclient.InferenceServerClient(runtime.http),
        grpcclient.InferenceServerClient(runtime.grpc),
    ]
    yield made
    for client in made:
        client.close()


def _status(client: Any, name: str = "") -> dict[str, tuple[str, int, int]]:
    """Region name -> (key, offset, byte_size), from either client's status."""
    status = client.get_system_shared_memory_status(name)
    if isinstance(client, httpclient.InferenceServerClient):
        return {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status}
    return {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()}


def _output_meta(result: Any, name: str) -> tuple[str, list[int], dict[str, Any]]:
    output = result.get_output(name)
    if isinstance(output, dict):
        return output["datatype"], output["shape"], output.get("parameters", {})
    parameters = {k: (v.string_param or v.int64_param) for k, v in output.parameters.items()}
    return output.datatype, list(output.shape), parameters


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_register_infer_from_regions_and_unregister(
    clients: list[Any], regions: Objects, kind: str
) -> None:
    client = clients[kind == "grpc"]
    module = httpclient if kind == "http" else grpcclient
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()  # (as Triton's examples begin)
    in_key, in_handle = regions.create(f"in-{kind}", 2 * SIXTEEN)
    out_key, out_handle = regions.create(f"out-{kind}", 2 * SIXTEEN)
    shm.set_shared_memory_region(in_handle, [IN0])
    shm.set_shared_memory_region(in_handle, [IN1], offset=SIXTEEN)
    client.register_system_shared_memory("input/data", in_key, 2 * SIXTEEN)
    client.register_system_shared_memory("output_data", out_key, 2 * SIXTEEN)
    assert _status(client) == {
        "input/data": (in_key, 0, 2 * SIXTEEN),
        "output_data": (out_key, 0, 2 * SIXTEEN),
    }
    assert _status(client, "output_data") == {"output_data": (out_key, 0, 2 * SIXTEEN)}

    inputs = [module.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
    inputs[0].set_shared_memory("input/data", SIXTEEN)
    inputs[1].set_shared_memory("input/data", SIXTEEN, offset=SIXTEEN)
    outputs = [module.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
    outputs[0].set_shared_memory("output_data", SIXTEEN)
    outputs[1].set_shared_memory("output_data", SIXTEEN, offset=SIXTEEN)
    result = client.infer("simple", inputs, outputs=outputs)

    datatype, shape, parameters = _output_meta(result, "OUTPUT1")
    assert (datatype, shape) == ("INT32", [1, 16])
    assert parameters["shared_memory_region"] == "output_data"
    assert parameters["shared_memory_byte_size"] == SIXTEEN
    if kind == "http":  # the answer holds no data, and is JSON alone
        assert all("data" not in o for o in result.get_response()["outputs"])
    dtype = utils.triton_to_np_dtype(datatype)
    total = shm.get_contents_as_numpy(out_handle, dtype, shape)
    difference = shm.get_contents_as_numpy(out_handle, dtype, shape, offset=SIXTEEN)
    np.testing.assert_array_equal(total, IN0 + IN1)
    np.testing.assert_array_equal(difference, IN0 - IN1)

    client.unregister_system_shared_memory("input/data")
    assert set(_status(client)) == {"output_data"}
    client.unregister_system_shared_memory()
    assert _status(client) == {}


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_regions_mix_with_tensors_sent_in_the_request(
    clients: list[Any], regions: Objects, kind: str
) -> None:
    """One input and one output in a region, the others in the request and its answer."""
    client = clients[kind == "grpc"]
    module = httpclient if kind == "http" else grpcclient
    in_key, in_handle = regions.create("in", SIXTEEN)
    out_key, out_handle = regions.create("out", 3 * SIXTEEN)
    shm.set_shared_memory_region(in_handle, [IN1])
    client.register_system_shared_memory(f"mix-in-{kind}", in_key, SIXTEEN)
    # a region that starts 32 bytes into its object
    client.register_system_shared_memory(f"mix-out-{kind}", out_key, 2 * SIXTEEN, offset=32)
    try:
        inputs = [module.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
        inputs[0].set_data_from_numpy(IN0)
        inputs[1].set_shared_memory(f"mix-in-{kind}", SIXTEEN)
        outputs = [module.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
        outputs[0].set_shared_memory(f"mix-out-{kind}", SIXTEEN, offset=SIXTEEN)
        result = client.infer("simple", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), IN0 - IN1)
        written = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=32 + SIXTEEN)
        np.testing.assert_array_equal(written, IN0 + IN1)
    finally:
        client.unregister_system_shared_memory()


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_bytes_tensors_travel_serialized_as_triton_does(
    clients: list[Any], regions: Objects, kind: str
) -> None:
    client = clients[kind == "grpc"]
    module = httpclient if kind == "http" else grpcclient
    numbers = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    ones = np.array([[b"1"] * 16], dtype=object)
    serialized = [utils.serialize_byte_tensor(a) for a in (numbers, ones)]
    sizes = [utils.serialized_byte_size(s) for s in serialized]
    expected = np.array([[str(i + 1).encode() for i in range(16)]], dtype=object)
    out_size = utils.serialized_byte_size(utils.serialize_byte_tensor(expected))
    keys = []
    for index, (data, size) in enumerate(zip(serialized, sizes, strict=True)):
        key, handle = regions.create(f"s{index}", size)
        shm.set_shared_memory_region(handle, [data])
        keys.append(key)
    out_key, out_handle = regions.create("sout", out_size)
    try:
        inputs = []
        for index, key in enumerate(keys):
            client.register_system_shared_memory(f"s{index}-{kind}", key, sizes[index])
            inputs.append(module.InferInput(f"INPUT{index}", [1, 16], "BYTES"))
            inputs[-1].set_shared_memory(f"s{index}-{kind}", sizes[index])
        client.register_system_shared_memory(f"sout-{kind}", out_key, out_size)
        output = module.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory(f"sout-{kind}", out_size)
        result = client.infer("simple_string", inputs, outputs=[output])
        datatype, shape, _ = _output_meta(result, "OUTPUT0")
        got = shm.get_contents_as_numpy(out_handle, utils.triton_to_np_dtype(datatype), shape)
        assert got.tolist() == expected.tolist()
    finally:
        client.unregister_system_shared_memory()


def _refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_keys_outside_dev_shm_and_links_are_refused(
    clients: list[Any], regions: Objects, kind: str, tmp_path: Path
) -> None:
    client = clients[kind == "grpc"]
    register = client.register_system_shared_memory
    for key in ("/../../etc/shadow", "../etc/passwd", "/a/b", "/..", "", "x" * 300):
        message = _refused(register, "bad", key, 8)
        assert "key" in message, message
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only" * 100)
    secret.chmod(0o600)
    link = Path("/dev/shm") / f"omni-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(secret)
    try:
        message = _refused(register, "link", f"/{link.name}", 8)
        assert "symbolic link" in message, message
    finally:
        link.unlink()
    message = _refused(register, "gone", "/omni-test-no-such-object", 8)
    assert "Unable to open shared memory region: '/omni-test-no-such-object'" in message
    fifo = Path("/dev/shm") / f"omni-test-fifo-{uuid.uuid4().hex[:8]}"
    os.mkfifo(fifo)
    try:
        message = _refused(register, "fifo", f"/{fifo.name}", 8)
        assert "not a shared memory object" in message, message
    finally:
        fifo.unlink()
    assert _status(client) == {}


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_sizes_past_the_region_are_refused(clients: list[Any], regions: Objects, kind: str) -> None:
    client = clients[kind == "grpc"]
    module = httpclient if kind == "http" else grpcclient
    key, handle = regions.create("small", SIXTEEN)
    shm.set_shared_memory_region(handle, [IN0])
    message = _refused(client.register_system_shared_memory, "big", key, SIXTEEN, offset=8)
    assert "failed to register shared memory region 'big': invalid args" in message, message
    client.register_system_shared_memory("small", key, SIXTEEN)
    try:
        message = _refused(client.register_system_shared_memory, "small", key, 8)
        assert "shared memory region 'small' already in manager" in message, message

        def infer(in_size: int, in_offset: int, out_size: int, region: str = "small") -> str:
            inputs = [module.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
            inputs[0].set_shared_memory(region, in_size, offset=in_offset)
            inputs[1].set_data_from_numpy(IN1)
            output = module.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory("small", out_size)
            return _refused(client.infer, "simple", inputs, outputs=[output])

        message = infer(SIXTEEN, 4, SIXTEEN)
        assert "past the end of shared memory region 'small' (64 bytes)" in message, message
        message = infer(32, 0, SIXTEEN)
        assert "shared_memory_byte_size is 32 bytes, but shape [1, 16] of INT32 holds 64" in (
            message
        )
        message = infer(SIXTEEN, 0, 8)
        assert "output 'OUTPUT0' needs 64 bytes" in message and "was given 8" in message
        message = infer(SIXTEEN, 0, SIXTEEN, region="nowhere")
        assert "Unable to find system shared memory region: 'nowhere'" in message, message
        # the output region is left as it was when the answer did not fit
        unchanged = shm.get_contents_as_numpy(handle, np.int32, [1, 16])
        np.testing.assert_array_equal(unchanged, IN0)
        message = _refused(client.get_system_shared_memory_status, "nowhere")
        assert "Unable to find system shared memory region: 'nowhere'" in message
    finally:
        client.unregister_system_shared_memory()


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_inputs_from_regions_count_toward_the_body_size_limit(
    clients: list[Any], regions: Objects, kind: str
) -> None:
    client = clients[kind == "grpc"]
    module = httpclient if kind == "http" else grpcclient
    rows = 1280  # 80 KiB of INT32, over the runtime's 64 KiB
    key, _ = regions.create("large", rows * SIXTEEN)
    client.register_system_shared_memory("large", key, rows * SIXTEEN)
    try:
        inputs = [module.InferInput(f"INPUT{i}", [rows, 16], "INT32") for i in (0, 1)]
        inputs[0].set_shared_memory("large", rows * SIXTEEN)
        inputs[1].set_shared_memory("large", rows * SIXTEEN)
        message = _refused(client.infer, "simple", inputs)
        assert "more than the server's limit of 65536 bytes" in message, message
    finally:
        client.unregister_system_shared_memory()


def test_an_object_truncated_after_registration_is_an_error_not_a_crash(
    clients: list[Any], regions: Objects
) -> None:
    client = clients[0]
    key, _ = regions.create("shrinks", 2 * SIXTEEN)
    client.register_system_shared_memory("shrinks", key, 2 * SIXTEEN)
    try:
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 8)
        inputs = [httpclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
        inputs[0].set_shared_memory("shrinks", SIXTEEN)
        inputs[1].set_shared_memory("shrinks", SIXTEEN, offset=SIXTEEN)
        message = _refused(client.infer, "simple", inputs)
        assert "was truncated" in message, message
        assert client.is_server_live()
    finally:
        client.unregister_system_shared_memory()


def _register_as(uid: int, port: int, key: str) -> tuple[int, str]:
    """Register ``key`` from a child process running as ``uid``: (status, body)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, make one request with what is already imported
        try:
            os.close(reader)
            os.setgid(uid)
            os.setuid(uid)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"key": key, "offset": 0, "byte_size": 8})
            connection.request("POST", f"/v2/systemsharedmemory/region/u{uid}/register", body)
            response = connection.getresponse()
            os.write(writer, f"{response.status} ".encode() + response.read())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    status, _, body = answer.partition(" ")
    return int(status), body


def test_a_client_reaches_only_objects_of_its_own_user(
    runtime: Runtime, clients: list[Any], regions: Objects
) -> None:
    port = int(runtime.http.rpartition(":")[2])
    nobody = 65534
    key, _ = regions.create("roots", 64)  # made by this test, as root
    path = Path("/dev/shm") / key.lstrip("/")
    path.chmod(0o666)  # even an object anyone may open is refused: it is not the client's
    status, body = _register_as(nobody, port, key)
    assert status == 403 and "belongs to another user" in body, body
    os.chown(path, nobody, nobody)
    status, body = _register_as(nobody, port, key)
    assert status == 200, body
    client = clients[0]
    assert set(_status(client)) == {f"u{nobody}"}
    client.unregister_system_shared_memory()


def test_cuda_shared_memory_is_refused_saying_why(clients: list[Any]) -> None:
    for client, handle in zip(clients, ("AAAA", b"\0" * 64), strict=True):
        client.unregister_cuda_shared_memory()  # nothing to unregister: no error
        message = _refused(client.register_cuda_shared_memory, "gpu", handle, 0, 64)
        assert "CUDA shared memory is not supported by this server" in message, message
    assert clients[0].get_cuda_shared_memory_status() == []
    message = _refused(clients[0].get_cuda_shared_memory_status, "gpu/0")
    assert "Unable to find cuda shared memory region: 'gpu/0'" in message, message


def test_server_metadata_and_config_show_the_extension_and_the_batch_dimension(
    clients: list[Any],
) -> None:
    http, rpc = clients
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]
    assert "system_shared_memory" in rpc.get_server_metadata().extensions
    config = http.get_model_config("simple")
    assert config["max_batch_size"] == 8
    assert [t["dims"] for t in config["input"] + config["output"]] == [[16]] * 4
    proto = rpc.get_model_config("simple").config
    assert proto.max_batch_size == 8
    assert [list(t.dims) for t in [*proto.input, *proto.output]] == [[16]] * 4


def test_registration_needs_the_api_token_when_tokens_are_set(
    repository: Path, regions: Objects
) -> None:
    key, _ = regions.create("guarded", 64)
    env = {"OMNI_API_TOKEN": "api-secret"}
    with serve(repository, extra=["--grpc-port", "0"], env=env) as running:
        runtime = Runtime(running)
        http = httpclient.InferenceServerClient(runtime.http)
        rpc = grpcclient.InferenceServerClient(runtime.grpc)
        message = _refused(http.register_system_shared_memory, "guarded", key, 64)
        assert "OMNI_API_TOKEN" in message, message
        assert "OMNI_API_TOKEN" in _refused(http.get_system_shared_memory_status)
        with pytest.raises(InferenceServerException) as info:
            rpc.register_system_shared_memory("guarded", key, 64)
        assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        headers = {"authorization": "Bearer api-secret"}
        http.register_system_shared_memory("guarded", key, 64, headers=headers)
        assert set(_status_with(rpc, headers)) == {"guarded"}
        rpc.unregister_system_shared_memory(headers=headers)
        assert http.get_system_shared_memory_status(headers=headers) == []
        http.close()
        rpc.close()


def _status_with(client: Any, headers: dict[str, str]) -> dict[str, Any]:
    return dict(client.get_system_shared_memory_status(headers=headers).regions)
