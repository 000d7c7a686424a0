"""A soak test: the runtime under mixed good and bad load for a long while.

    python bench/soak.py [--duration 600] [--concurrency 8] [--bad-fraction 0.1] [--seed 1]
                         [--exclude REGEX]

Starts `omni-runtime serve` (with --shared-env where the CLI has it) on the echo-models and
tensor-models fixtures, on 127.0.0.1 and a free port, with --max-body-size 2MiB. --concurrency
closed-loop clients (asyncio, in this one process, each on its own HTTP/1.1 keep-alive
connection) then send requests for --duration seconds. Each request is a good one (GOOD: v2
JSON, v2 binary bodies built by tritonclient, /ai/run; to @test/echo, @test/identity,
@test/numbers and @test/batch) or, with probability --bad-fraction, one of BAD: malformed
JSON, wrong datatypes and shapes, unknown models and inputs, numbers out of range, truncated
binary bodies, a lying Inference-Header-Content-Length, a body over the limit, and so on.
--exclude leaves out the kinds whose names it matches (re.search), e.g. a known crasher that
would otherwise keep a model in crash backoff for the whole run.

Every answer is classified. A good request must get 200 and the right answer; a bad one a 4xx.
Unexpected errors: a good request answered any other way, and a bad request answered 5xx or
not answered at all (dropped connection, timeout). A bad request answered 2xx is counted apart,
and fails the run too.

The resident memory (VmRSS) of the runtime and of each of its descendants (workers, sandbox
launchers, pre-warmed processes; found by walking /proc, where workers in their own pid
namespaces still have host pids) is sampled every --sample-every seconds. Growth is measured
from the end of the warm-up (10% of the run, at least 30 s, at most half of it) to the end.
Worker restarts: omni_model_evictions_total with reason crash, oom or hung, from /metrics.

Always exits 0 (it is a benchmark); the last line printed is the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as triton

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "packages"
PACKAGES = (FIXTURES / "echo-models", FIXTURES / "tensor-models")
POOL = 64  # requests built per good kind before the run, so building them costs no load time
MAX_BODY = 2 << 20
TIMEOUT = 30.0  # seconds for an answer; longer counts as a timeout
LINGER = 10.0  # seconds a descendant may outlive the stopped runtime before it is reported
READY = re.compile(r"omni-runtime: serving \d+ of \d+ models at (http://\S+)")
STARTED = re.compile(r"model '([^']+)' ready: replica \d+, worker pid (\d+)")
NOTEWORTHY = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|exited|killed")
RESTART_REASONS = ("crash", "oom", "hung")
TICKS = os.sysconf("SC_CLK_TCK")

JSON = {"Content-Type": "application/json"}
ECHO = "/v2/models/@test/echo/infer"
IDENTITY = "/v2/models/@test/identity/infer"
NUMBERS = "/v2/models/@test/numbers/infer"
WORDS = ("hello", "soak", "α-beta", "emoji 🙂", "", "x" * 300, "tab\tand\nnewline")
INT_RANGES = {
    "INT8": (-(1 << 7), (1 << 7) - 1), "INT16": (-(1 << 15), (1 << 15) - 1),
    "INT32": (-(1 << 31), (1 << 31) - 1), "INT64": (-(1 << 63), (1 << 63) - 1),
    "UINT8": (0, (1 << 8) - 1), "UINT16": (0, (1 << 16) - 1),
    "UINT32": (0, (1 << 32) - 1), "UINT64": (0, (1 << 64) - 1),
}  # fmt: skip
# In JSON, the mixed kinds keep UINT64 below 2**63: above it has kinds of its own (see GOOD).
JSON_RANGES = INT_RANGES | {"UINT64": (0, (1 << 63) - 1)}
NUMPY = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}  # fmt: skip


# -- the client -----------------------------------------------------------------------------


@dataclass
class Call:
    """One request; ``check`` (good requests only) says what is wrong with a 200, or None."""

    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    check: Callable[[Answer], str | None] | None = None


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]  # names in lower case
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Dropped(Exception):
    """The connection closed, or failed, before a whole answer came."""


class Connection:
    """One keep-alive HTTP/1.1 connection, sending bodies exactly as given.

    A client this small costs a tenth of httpx's CPU per request, which leaves the two cores
    of a small machine to the runtime rather than to the load generator.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.reused = False  # whether an answer came on it already

    async def request(self, call: Call) -> Answer:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            self.reused = False
        reader, writer = self.streams
        lines = [f"{call.method} {call.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if call.method != "GET":
            lines.append(f"Content-Length: {len(call.body)}")
        lines += [f"{name}: {value}" for name, value in call.headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + call.body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._chunked(reader)
            else:
                body = await reader.read()
                headers["connection"] = "close"
        except asyncio.IncompleteReadError as exc:
            reused = " (a kept-alive connection)" if self.reused and not exc.partial else ""
            self.close()
            raise Dropped(f"closed after {len(exc.partial)} bytes of the answer{reused}") from None
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise Dropped(f"{type(exc).__name__}: {exc}") from None
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.reused = True
        return Answer(int(status.split(" ", 2)[1]), headers, body)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # the (empty) trailer
        return body

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class Rng:
    """Where the requests' values come from: ``py`` for choices, ``np`` for arrays."""

    def __init__(self, seed: int) -> None:
        self.py = random.Random(seed)
        self.np = np.random.default_rng(seed)


def dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def v2(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return dumps({"inputs": inputs, **extra})


def tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def binary_call(path: str, inputs: list[triton.InferInput], outputs: list[str], check: Any) -> Call:
    """A v2 binary-extension request as tritonclient builds it, binary outputs asked for."""
    requested = [triton.InferRequestedOutput(name, binary_data=True) for name in outputs]
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=requested)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return Call(path, body, headers, check=check)


def parse_binary(response: Answer) -> Any:
    length = response.headers.get("inference-header-content-length")
    return triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(length) if length else None
    )


def triton_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    item = triton.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array, binary_data=True)
    return item


def json_values(datatype: str, count: int, rng: Rng) -> list[Any]:
    """Values of ``datatype`` that survive a round trip exactly, edges of the range included."""
    if datatype in JSON_RANGES:
        low, high = JSON_RANGES[datatype]
        return [
            rng.py.choice((low, high, 0)) if rng.py.random() < 0.2 else rng.py.randint(low, high)
            for _ in range(count)
        ]
    if datatype.startswith("FP"):
        return [rng.py.randint(-400, 400) / 4 for _ in range(count)]
    if datatype == "BOOL":
        return [rng.py.random() < 0.5 for _ in range(count)]
    return [rng.py.choice(WORDS) for _ in range(count)]


def array_values(datatype: str, count: int, rng: Rng) -> np.ndarray:
    if datatype in INT_RANGES:
        low, high = INT_RANGES[datatype]
        dtype = NUMPY[datatype]
        return rng.np.integers(low, high, size=count, dtype=dtype, endpoint=True)
    if datatype.startswith("FP"):
        return (rng.np.integers(-400, 400, size=count) / 4).astype(NUMPY[datatype])
    if datatype == "BOOL":
        return rng.np.random(count) < 0.5
    return np.array([rng.py.choice(WORDS).encode() for _ in range(count)], dtype=np.object_)


def v2_outputs(response: Answer) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


def expect(got: object, wanted: object) -> str | None:
    return None if got == wanted else f"got {str(got)[:200]}, expected {str(wanted)[:200]}"


# -- good requests -------------------------------------------------------------------------


def echo_v2_json(rng: Rng) -> Call:
    text, count = rng.py.choice(WORDS), rng.py.randint(1, 4)
    values = [rng.py.randint(-40, 40) / 4 for _ in range(rng.py.randint(1, 16))]
    body = v2(
        [
            tensor("text", "BYTES", [1], [text]),
            tensor("count", "INT64", [1], [count]),
            tensor("values", "FP32", [len(values)], values),
            tensor("words", "BYTES", [2], [rng.py.choice(WORDS), rng.py.choice(WORDS)]),
            tensor("flag", "BOOL", [1], [True]),
        ]
    )
    return Call(ECHO, body, check=lambda r: expect(v2_outputs(r)["text"], [text * count]))


def echo_v2_binary(rng: Rng) -> Call:
    text, count = rng.py.choice(WORDS).encode(), rng.py.randint(1, 4)
    matrix = array_values("FP32", 6, rng).reshape(2, 3)
    inputs = [
        triton_input("text", np.array([text], dtype=np.object_), "BYTES"),
        triton_input("count", np.array([count], dtype=np.int64), "INT64"),
        triton_input("matrix", matrix, "FP32"),
    ]

    def check(response: Answer) -> str | None:
        result = parse_binary(response)
        if not np.array_equal(result.as_numpy("matrix"), matrix):
            return f"matrix {result.as_numpy('matrix').tolist()}, expected {matrix.tolist()}"
        return expect(result.as_numpy("text").tolist(), [text * count])

    return binary_call(ECHO, inputs, ["text", "matrix"], check)


def identity_inputs(rng: Rng) -> dict[str, list[Any]]:
    """One to four inputs of @test/identity, by name; all the same length (dimension 0)."""
    count = rng.py.randint(1, 8)
    names = rng.py.sample(sorted(NUMPY), rng.py.randint(1, 4))
    return {n.lower(): json_values(n, count, rng) for n in names}


def identity_v2_json(rng: Rng) -> Call:
    inputs = identity_inputs(rng)
    body = v2([tensor(name, name.upper(), [len(v)], v) for name, v in inputs.items()])
    return Call(IDENTITY, body, check=lambda r: expect(v2_outputs(r), inputs))


def high_uint64(rng: Rng) -> list[int]:
    return [rng.py.randint(0, 1 << 63), rng.py.randint(1 << 63, (1 << 64) - 1), (1 << 64) - 1]


def uint64_v2_json(rng: Rng) -> Call:
    values = high_uint64(rng)
    body = v2([tensor("uint64", "UINT64", [3], values)])
    return Call(IDENTITY, body, check=lambda r: expect(v2_outputs(r), {"uint64": values}))


def uint64_ai_run(rng: Rng) -> Call:
    body = {"uint64": high_uint64(rng)}
    return Call(
        "/ai/run/@test/identity",
        dumps(body),
        check=lambda r: expect(r.json()["result"]["uint64"], body["uint64"]),
    )


def identity_binary(rng: Rng, names: list[str], count: int) -> Call:
    arrays = {n: array_values(n, count, rng) for n in names}
    inputs = [triton_input(n.lower(), a, n) for n, a in arrays.items()]

    def check(response: Answer) -> str | None:
        result = parse_binary(response)
        for name, array in arrays.items():
            got = result.as_numpy(name.lower())
            if got is None or not np.array_equal(got, array):
                return f"output {name.lower()!r} differs from its input"
        return None

    return binary_call(IDENTITY, inputs, [n.lower() for n in names], check)


def identity_v2_binary(rng: Rng) -> Call:
    return identity_binary(rng, rng.py.sample(sorted(NUMPY), rng.py.randint(1, 4)), 64)


def identity_v2_binary_large(rng: Rng) -> Call:
    """512 KiB each way: over the 256 KiB shm_threshold, so the payload travels as a memfd."""
    return identity_binary(rng, ["FP32"], 1 << 17)


def echo_ai_run(rng: Rng) -> Call:
    text, count = rng.py.choice(WORDS), rng.py.randint(1, 4)
    body = {"text": text, "count": count, "values": [1.5, 2.5], "words": ["a", text]}
    return Call(
        "/ai/run/@test/echo",
        dumps(body),
        check=lambda r: expect(r.json()["result"]["text"], text * count),
    )


def identity_ai_run(rng: Rng) -> Call:
    body = identity_inputs(rng)
    return Call(
        "/ai/run/@test/identity",
        dumps(body),
        check=lambda r: expect({k: r.json()["result"][k] for k in body}, body),
    )


def numbers_ai_run(rng: Rng) -> Call:
    ints = [rng.py.choice((0, 7, -(1 << 63), (1 << 63) - 1)) for _ in range(rng.py.randint(0, 8))]
    body = {"ints": ints, "floats": json_values("FP64", rng.py.randint(0, 8), rng)}
    path = "/ai/run/@test/numbers"
    return Call(path, dumps(body), check=lambda r: expect(r.json()["result"], body))


def batch_ai_run(rng: Rng) -> Call:
    text = rng.py.choice(WORDS)
    return Call(
        "/ai/run/@test/batch",
        dumps({"text": text}),
        check=lambda r: expect(r.json()["result"]["text"], text.upper()),
    )


GOOD: dict[str, tuple[int, Callable[[Rng], Call]]] = {  # name: (weight, builder)
    "v2 JSON @test/echo": (4, echo_v2_json),
    "v2 binary @test/echo": (4, echo_v2_binary),
    "v2 JSON @test/identity": (4, identity_v2_json),
    "v2 binary @test/identity": (4, identity_v2_binary),
    "v2 binary 512KiB @test/identity": (1, identity_v2_binary_large),
    "ai/run @test/echo": (4, echo_ai_run),
    "ai/run @test/identity": (3, identity_ai_run),
    "ai/run @test/numbers": (2, numbers_ai_run),
    "ai/run @test/batch": (2, batch_ai_run),
    "v2 JSON UINT64 >= 2**63 @test/identity": (1, uint64_v2_json),
    "ai/run UINT64 >= 2**63 @test/identity": (1, uint64_ai_run),
}


# -- bad requests ---------------------------------------------------------------------------


def _binary(path: str, body: bytes, header_length: str) -> Call:
    headers = {"Content-Type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = header_length
    return Call(path, body, headers)


def _binary_tensor(name: str, datatype: str, shape: list[int], data: bytes) -> Call:
    """A binary-extension request whose one input announces ``len(data)`` bytes."""
    parameters = {"binary_data_size": len(data)}
    header = v2([{"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}])
    return _binary(IDENTITY, header + data, str(len(header)))


TEXT = tensor("text", "BYTES", [1], ["x"])
BIG_INT64 = tensor("ints", "INT64", [2], [1, 1 << 80])
NO_BINARY_DATA = {"name": "fp32", "datatype": "FP32", "shape": [1]}
FP32_BODY, FP32_HEADER = triton.InferenceServerClient.generate_request_body(
    [triton_input("fp32", np.ones(1024, dtype=np.float32), "FP32")]
)

BAD: dict[str, Call] = {
    "malformed JSON (v2)": Call(ECHO, b'{"inputs": [{"name": "text", "datatype": "BY'),
    "malformed JSON (ai/run)": Call("/ai/run/@test/echo", b'{"text": "unterminated'),
    "not UTF-8 (ai/run)": Call("/ai/run/@test/echo", b'{"text": "\xff\xfe\xfd"}'),
    "not UTF-8 (v2)": Call(ECHO, b'{"inputs": [{"name": "\xff\xfe"}]}'),
    "empty body (v2)": Call(ECHO, b""),
    "a JSON array, not an object (ai/run)": Call("/ai/run/@test/echo", b"[1, 2, 3]"),
    "no 'inputs' list (v2)": Call(ECHO, b'{"inputs": {"text": "x"}}'),
    "wrong datatype: text as FP32": Call(ECHO, v2([tensor("text", "FP32", [1], [1.5])])),
    "wrong datatype: INT64 given 1.5": Call(ECHO, v2([TEXT, tensor("count", "INT64", [1], [1.5])])),
    "unknown datatype FP8": Call(IDENTITY, v2([tensor("fp32", "FP8", [1], [1.0])])),
    "wrong field types (ai/run)": Call("/ai/run/@test/echo", dumps({"text": 5, "count": "many"})),
    "data does not fill the shape": Call(
        ECHO, v2([TEXT, tensor("matrix", "FP32", [2, 3], [1.0, 2.0, 3.0, 4.0, 5.0])])
    ),
    "wrong rank: count as [1, 1]": Call(ECHO, v2([TEXT, tensor("count", "INT64", [1, 1], [[1]])])),
    "ragged nested data": Call(
        IDENTITY, v2([tensor("matrix", "FP32", [2, 2], [[1.0], [1.0, 2.0]])])
    ),
    "negative shape": Call(IDENTITY, v2([tensor("fp32", "FP32", [-4], [1, 2, 3, 4])])),
    "shape over max_tensor_elements": Call(
        IDENTITY, v2([tensor("fp32", "FP32", [1 << 25], [1.0])])
    ),
    "unknown model (v2)": Call("/v2/models/@test/nobody/infer", v2([TEXT])),
    "unknown model (ai/run)": Call("/ai/run/@nobody/nothing", b'{"text": "x"}'),
    "unknown input": Call(ECHO, v2([TEXT, tensor("nope", "BYTES", [1], ["x"])])),
    "the same input twice": Call(ECHO, v2([TEXT, TEXT])),
    "missing required input": Call(ECHO, v2([tensor("count", "INT64", [1], [2])])),
    "INT64 2**80 to @test/numbers": Call(NUMBERS, v2([BIG_INT64])),
    "INT64 2**80 to @test/numbers, binary output": Call(
        NUMBERS, v2([BIG_INT64], parameters={"binary_data_output": True})
    ),
    "INT64 2**80 to @test/identity": Call(IDENTITY, v2([{**BIG_INT64, "name": "int64"}])),
    "INT64 2**80 to @test/identity (ai/run)": Call(
        "/ai/run/@test/identity", dumps({"int64": [1 << 80]})
    ),
    "UINT8 -1": Call(IDENTITY, v2([tensor("uint8", "UINT8", [1], [-1])])),
    "INT32 2**31": Call(IDENTITY, v2([tensor("int32", "INT32", [1], [1 << 31])])),
    "BOOL given 'yes'": Call(IDENTITY, v2([tensor("bool", "BOOL", [1], ["yes"])])),
    "a 5000-digit integer": Call(
        IDENTITY,
        b'{"inputs": [{"name": "int64", "datatype": "INT64", "shape": [1], "data": ['
        + b"9" * 5000
        + b"]}]}",
    ),
    "JSON nested 100000 deep": Call(
        IDENTITY,
        b'{"inputs": [{"name": "fp32", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}]}",
    ),
    "'nan' as a string (ai/run)": Call("/ai/run/@test/identity", b'{"fp32": ["nan"]}'),
    "outputs not a list": Call(ECHO, v2([TEXT], outputs="all")),
    "unknown output": Call(ECHO, v2([TEXT], outputs=[{"name": "nope"}])),
    "truncated binary body": _binary(IDENTITY, FP32_BODY[:-1000], str(FP32_HEADER)),
    "Inference-Header-Content-Length past the body": _binary(
        IDENTITY, FP32_BODY, str(len(FP32_BODY) + 1000)
    ),
    "Inference-Header-Content-Length 2**64": _binary(IDENTITY, FP32_BODY, str(1 << 64)),
    "Inference-Header-Content-Length cuts the JSON": _binary(
        IDENTITY, FP32_BODY, str(FP32_HEADER - 10)
    ),
    "Inference-Header-Content-Length not a number": _binary(IDENTITY, FP32_BODY, "twelve"),
    "Inference-Header-Content-Length negative": _binary(IDENTITY, FP32_BODY, "-5"),
    "binary size not a multiple of FP32": _binary_tensor("fp32", "FP32", [2], b"\0" * 7),
    "BYTES length prefix past the end": _binary_tensor(
        "bytes", "BYTES", [1], struct.pack("<I", 1000) + b"abc"
    ),
    "binary_data_size without binary data": Call(
        IDENTITY, v2([{**NO_BINARY_DATA, "parameters": {"binary_data_size": 4}}])
    ),
    "body over --max-body-size": Call(
        "/ai/run/@test/echo", b'{"text": "' + b"x" * MAX_BODY + b'"}'
    ),
    "headers over max_header_size": Call(
        "/ai/run/@test/echo", b'{"text": "x"}', {**JSON, "X-Padding": "p" * 20_000}
    ),
    "GET on an infer route": Call(ECHO, method="GET"),
}


# -- classifying answers --------------------------------------------------------------------


@dataclass
class Kind:
    good: bool
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> int:
        if self.good:
            return self.sent - self.outcomes["2xx"]  # a wrong answer is not counted as 2xx
        return self.sent - self.outcomes["4xx"] - self.outcomes["2xx"]

    @property
    def accepted(self) -> int:
        """Bad requests answered 2xx."""
        return 0 if self.good else self.outcomes["2xx"]


def record(kind: Kind, call: Call, outcome: str, status: int | None, detail: str) -> None:
    kind.sent += 1
    kind.outcomes[outcome] += 1
    expected = outcome == "2xx" if kind.good else outcome == "4xx"
    if not expected and len(kind.examples) < 3:
        body = call.body[:120] + (b"..." if len(call.body) > 120 else b"")
        extra = {k: v[:40] for k, v in call.headers.items() if k != "Content-Type"}
        kind.examples.append(
            f"{call.method} {call.path} {extra or ''} {body!r} -> "
            f"{status if status is not None else outcome}: {detail[:300]}"
        )


def outcome_of(status: int) -> str:
    return f"{status // 100}xx" if 200 <= status < 600 else "other"


def build_pools(seed: int, kinds: dict[str, Kind]) -> dict[str, list[Call]]:
    """POOL requests of each good kind, built before the run, and the one of each bad kind."""
    rng = Rng(seed)
    pools = {name: [GOOD[name][1](rng) for _ in range(POOL)] for name in GOOD if name in kinds}
    return pools | {name: [BAD[name]] for name in BAD if name in kinds}


async def drive(
    connection: Connection,
    kinds: dict[str, Kind],
    pools: dict[str, list[Call]],
    until: float,
    rng: random.Random,
    bad_fraction: float,
) -> None:
    """One closed-loop client: a request, its answer classified, the next request."""
    good_names = [name for name in GOOD if name in kinds]
    weights = [GOOD[name][0] for name in good_names]
    bad_names = [name for name in BAD if name in kinds]
    while time.monotonic() < until:
        if bad_names and rng.random() < bad_fraction:
            name = rng.choice(bad_names)
        else:
            name = rng.choices(good_names, weights)[0]
        call = rng.choice(pools[name])
        kind = kinds[name]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT):
                response = await connection.request(call)
        except TimeoutError:
            connection.close()
            record(kind, call, "timeout", None, f"no answer in {TIMEOUT}s")
            continue
        except Dropped as exc:
            record(kind, call, "dropped", None, str(exc))
            continue
        kind.latencies.append(time.perf_counter() - started)
        outcome = outcome_of(response.status_code)
        detail = response.content[:300].decode(errors="replace")
        if kind.good and outcome == "2xx" and call.check is not None:
            try:
                wrong = call.check(response)
            except Exception as exc:
                wrong = f"{type(exc).__name__}: {exc}"
            if wrong is not None:
                outcome, detail = "wrong", wrong
        record(kind, call, outcome, response.status_code, detail)


# -- processes and memory -------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    role: str  # runtime, worker, launcher, pre-warmed, other
    label: str  # the model (or package) it serves
    rss_kb: int
    cpu_ticks: int  # user + system
    started: str  # start time since boot: tells a pid from a later one that reuses it


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from its third field (state) on: the name may hold spaces."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split() if stat else None


def process_tree(root: int, models: dict[int, str]) -> dict[int, Proc]:
    """The runtime and all its descendants, by host pid; ``models`` maps logged worker pids."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)):
            parents[int(entry)] = int(stat[1])
    tree = {root}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grew = bool(found)
    argvs = {pid: (_read(f"/proc/{pid}/cmdline") or "").split("\0") for pid in tree}
    procs = {}
    for pid in tree:
        status, fields = _read(f"/proc/{pid}/status"), _stat(pid)
        if not status or not fields:
            continue  # it ended meanwhile
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        argv = argvs[pid]
        label = models.get(pid) or models.get(parents.get(pid, 0), "")
        if pid == root:
            role = "runtime"
        elif any(a.endswith("sandbox.py") for a in argv):
            role = "launcher"
            label = label or _option(argv, "--model") or "(pre-warmed)"
        elif "omni_sdk.worker" in argv:
            role = "worker"
            label = label or _option(argv, "--model")
        elif "omni_sdk.prewarm" in argv:
            # A worker forked from a pre-warmed process keeps its parent's command line.
            forked = "omni_sdk.prewarm" in argvs.get(parents.get(pid, 0), [])
            role = "worker" if forked else "pre-warmed"
        else:
            role, label = "other", Path(argv[0]).name
        rss = int(match.group(1)) if match else 0
        procs[pid] = Proc(pid, role, label, rss, int(fields[11]) + int(fields[12]), fields[19])
    return procs


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1] if name in argv[:-1] else ""


def metric_counts(text: str, name: str) -> dict[tuple[str, ...], float]:
    """Samples of a counter from the /metrics page, keyed by their label values in name order."""
    counts = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            pairs = sorted(re.findall(r'(\w+)="([^"]*)"', labels))
            counts[tuple(v for _, v in pairs)] = float(value)
    return counts


# -- the runtime ---------------------------------------------------------------------------


class Runtime:
    """``omni-runtime serve`` on the fixtures; its output read on a thread."""

    def __init__(self) -> None:
        entry = Path(sys.executable).with_name("omni-runtime")
        command = [str(entry)] if entry.exists() else [sys.executable, "-m", "omni_runtime.cli"]
        usage = subprocess.run(
            [*command, "serve", "--help"], capture_output=True, text=True, check=True
        ).stdout
        self.shared_env = "--shared-env" in usage
        self.command = [
            *command,
            "serve",
            *map(str, PACKAGES),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-body-size",
            f"{MAX_BODY >> 20}MiB",
            "--log-level",
            "info",
            *(["--shared-env"] if self.shared_env else []),
        ]
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.models: dict[int, str] = {}  # worker pid (as logged) -> model
        self.noteworthy: list[str] = []  # warnings and errors it printed
        self.lines = 0
        self.url = self._wait_ready()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _wait_ready(self, timeout: float = 180) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        seen = []
        for line in self.process.stdout:
            seen.append(line.rstrip())
            if match := READY.search(line):
                return match.group(1)
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("omni-runtime did not start:\n" + "\n".join(seen[-30:]))

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines += 1
            if match := STARTED.search(line):
                self.models[int(match.group(2))] = match.group(1)
            elif NOTEWORTHY.search(line) and len(self.noteworthy) < 200:
                self.noteworthy.append(line.rstrip()[:400])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "_pump_thread"):
            self._pump_thread.join(5)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float  # seconds since the load began
    procs: dict[int, Proc]
    metrics: str
    cpu_self: float  # this process's CPU seconds: the load generator's


@dataclass
class Result:
    kinds: dict[str, Kind]
    samples: list[Snapshot]
    warm: Snapshot
    end: Snapshot
    exited: int | None = None  # the runtime's status, had it ended by itself
    log_during: int = 0  # how many of runtime.noteworthy it printed before it was stopped
    lingered: float = 0.0  # seconds its last descendant outlived it
    leftovers: list[Proc] = field(default_factory=list)  # still alive LINGER s after it ended


async def snapshot(runtime: Runtime, probe: Connection, began: float) -> Snapshot:
    try:
        async with asyncio.timeout(TIMEOUT):
            metrics = (await probe.request(Call("/metrics", method="GET"))).text
    except (TimeoutError, Dropped) as exc:
        probe.close()
        metrics = f"# /metrics failed: {exc!r}"
    procs = process_tree(runtime.process.pid, runtime.models)
    return Snapshot(time.monotonic() - began, procs, metrics, time.process_time())


async def soak(args: argparse.Namespace, runtime: Runtime) -> Result:
    kinds = {name: Kind(True) for name in GOOD} | {name: Kind(False) for name in BAD}
    if args.exclude:
        kinds = {name: kind for name, kind in kinds.items() if not re.search(args.exclude, name)}
    pools = build_pools(args.seed, kinds)
    host, port = runtime.url.removeprefix("http://").rsplit(":", 1)
    connections = [Connection(host, int(port)) for _ in range(args.concurrency + 1)]
    probe = connections.pop()
    began = time.monotonic()
    until = began + args.duration
    clients = [
        asyncio.create_task(
            drive(connection, kinds, pools, until, random.Random(args.seed + i), args.bad_fraction)
        )
        for i, connection in enumerate(connections)
    ]
    samples: list[Snapshot] = []
    warm: Snapshot | None = None
    last_line = 0.0
    while not all(c.done() for c in clients) and runtime.process.poll() is None:
        await asyncio.wait(clients, timeout=args.sample_every)
        sample = await snapshot(runtime, probe, began)
        samples.append(sample)
        if warm is None and sample.at >= args.warmup:
            warm = sample
        if sample.at - last_line >= 60:
            last_line = sample.at
            sent = sum(k.sent for k in kinds.values())
            unexpected = sum(k.unexpected for k in kinds.values())
            tree = sum(p.rss_kb for p in sample.procs.values()) / 1024
            own = sample.procs[runtime.process.pid].rss_kb / 1024
            print(
                f"  {sample.at:4.0f}s {sent:>9} requests {unexpected:>6} unexpected   RSS: "
                f"runtime {own:.1f} MiB, with its {len(sample.procs) - 1} processes {tree:.1f} MiB",
                flush=True,
            )
    for client in clients:
        client.cancel()  # only if the runtime ended early: they stop by themselves otherwise
    await asyncio.gather(*clients, return_exceptions=True)
    end = await snapshot(runtime, probe, began)
    for connection in [*connections, probe]:
        connection.close()
    return Result(kinds, samples, warm or samples[0], end)


# -- the report -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def print_requests(kinds: dict[str, Kind], seconds: float) -> None:
    columns = ("sent", "2xx", "4xx", "5xx", "drop", "t/o", "wrong", "unexp", "p50 ms", "p99 ms")
    widths = (8, 8, 7, 5, 5, 5, 6, 6, 8, 8)
    print(
        f"\n{'request kind':<48}"
        + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    )
    for good in (True, False):
        group = [(name, kind) for name, kind in kinds.items() if kind.good is good]
        print("good requests (need 200, right answer)" if good else "bad requests (need 4xx)")
        for name, kind in group:
            o = kind.outcomes
            cells = (
                kind.sent,
                o["2xx"],
                o["4xx"],
                o["5xx"],
                o["dropped"],
                o["timeout"],
                o["wrong"],
                kind.unexpected,
            )
            p50, p99 = percentile(kind.latencies, 0.5), percentile(kind.latencies, 0.99)
            print(
                f"  {name:<46}"
                + "".join(f"{c:>{w}}" for c, w in zip(cells, widths[:8], strict=True))
                + f"{p50:>8.2f}{p99:>8.2f}"
            )
        sent = sum(kind.sent for _, kind in group)
        unexpected = sum(kind.unexpected for _, kind in group)
        label = "all good" if good else "all bad"
        print(f"  {label:<46}{sent:>8}{unexpected:>42}")
    sent = sum(kind.sent for kind in kinds.values())
    unexpected = sum(kind.unexpected for kind in kinds.values())
    print(f"{'all requests':<48}{sent:>8}{unexpected:>42}   ({sent / seconds:.0f} req/s)")
    examples = [(name, e) for name, kind in kinds.items() for e in kind.examples]
    if examples:
        print("\nanswers not as required (up to 3 per kind):")
        for name, example in examples:
            print(f"  [{name}] {example}")


def print_memory(result: Result) -> list[tuple[float, str]]:
    """The RSS table; returns (growth %, process) for every process alive at both ends."""
    warm, end = result.warm, result.end
    window = max(end.at - warm.at, 1e-9)
    print(
        f"\nRSS in MiB at the end of the warm-up ({warm.at:.0f}s) and at the end ({end.at:.0f}s), "
        "peak between; CPU as % of one core between"
    )
    print(f"{'process':<36}{'pid':>8}{'warm':>9}{'end':>9}{'peak':>9}{'growth':>9}{'cpu':>7}")
    growths = []
    pids = sorted(set(warm.procs) | set(end.procs), key=lambda pid: (pid not in warm.procs, pid))
    for pid in pids:
        before, after = warm.procs.get(pid), end.procs.get(pid)
        if before and after and before.started != after.started:
            before = None  # the pid was reused
        proc = after or before
        assert proc is not None
        name = f"{proc.role} {proc.label}".strip()
        peak = (
            max(
                s.procs[pid].rss_kb
                for s in [*result.samples, end]
                if pid in s.procs and s.at >= warm.at
            )
            / 1024
        )
        if before and after:
            growth = (after.rss_kb - before.rss_kb) / max(before.rss_kb, 1) * 100
            growths.append((growth, f"{name}, pid {pid}"))
            cpu = (after.cpu_ticks - before.cpu_ticks) / TICKS / window * 100
            print(
                f"{name:<36}{pid:>8}{before.rss_kb / 1024:>9.1f}{after.rss_kb / 1024:>9.1f}"
                f"{peak:>9.1f}{growth:>8.1f}%{cpu:>6.0f}%"
            )
        elif after:
            print(
                f"{name:<36}{pid:>8}{'-':>9}{after.rss_kb / 1024:>9.1f}{peak:>9.1f}"
                "  (started after the warm-up)"
            )
        else:
            print(
                f"{name:<36}{pid:>8}{proc.rss_kb / 1024:>9.1f}{'-':>9}{peak:>9.1f}"
                "  (ended before the end)"
            )
    total_warm = sum(p.rss_kb for p in warm.procs.values()) / 1024
    total_end = sum(p.rss_kb for p in end.procs.values()) / 1024
    print(
        f"{'all of them':<36}{'':>8}{total_warm:>9.1f}{total_end:>9.1f}{'':>9}"
        f"{(total_end - total_warm) / total_warm * 100:>8.1f}%"
    )
    load = (end.cpu_self - warm.cpu_self) / window * 100
    print(f"{'load generator (this process)':<71}{load:>6.0f}%")
    # A leak climbs steadily; a heap settling after the warm-up rises and then stays.
    runtime_pid = next(pid for pid, proc in warm.procs.items() if proc.role == "runtime")
    step = max(60.0, (end.at - warm.at) / 10)
    marks, due = [], warm.at
    for sample in [*result.samples, end]:
        if sample.at >= due and runtime_pid in sample.procs:
            marks.append(f"{sample.procs[runtime_pid].rss_kb / 1024:.1f}")
            due = sample.at + step
    print(f"runtime RSS every {step:.0f}s from the end of the warm-up: {' '.join(marks)} MiB")
    return growths


def print_workers(result: Result) -> float:
    """Worker pids and evictions; returns the number of restarts (crash, oom, hung)."""
    evictions = metric_counts(result.end.metrics, "omni_model_evictions_total")
    at_warm = metric_counts(result.warm.metrics, "omni_model_evictions_total")
    restarts = {key: n for key, n in evictions.items() if key[1] in RESTART_REASONS}
    scaling = {key: n for key, n in evictions.items() if key[1] not in RESTART_REASONS}
    workers = {
        p.pid: p.label for s in result.samples for p in s.procs.values() if p.role == "worker"
    }

    def listing(counts: dict[tuple[str, ...], float]) -> str:
        return ", ".join(
            f"{model} {reason} {n:.0f}" for (model, reason, *_), n in sorted(counts.items())
        )

    print(
        f"\nworker pids seen: {len(workers)} ("
        + ", ".join(f"{label} {pid}" for pid, label in sorted(workers.items()))
        + ")"
    )
    print(f"worker restarts (omni_model_evictions_total crash/oom/hung): {listing(restarts) or 0}")
    print(
        f"other evictions (scaling): {listing(scaling) or 'none'}; "
        f"{sum(evictions.values()) - sum(at_warm.values()):.0f} after the warm-up"
    )
    return sum(restarts.values())


def print_log(runtime: Runtime, result: Result) -> None:
    during = runtime.noteworthy[: result.log_during]
    stopping = runtime.noteworthy[result.log_during :]
    print(
        f"\nruntime output: {runtime.lines} lines after the ready line; {len(during)} warnings "
        f"or errors under load, {len(stopping)} while it stopped"
    )
    for line in during[:10] + stopping[:5]:
        print(f"  {line}")
    if result.leftovers:
        left = ", ".join(f"{p.role} {p.label} {p.pid}".replace("  ", " ") for p in result.leftovers)
        print(f"still running {LINGER:.0f}s after the runtime ended: {left}")
    else:
        print(f"its last process ended {result.lingered:.1f}s after it")


def report(args: argparse.Namespace, runtime: Runtime, result: Result) -> None:
    kinds = result.kinds
    print_requests(kinds, args.duration)
    growths = print_memory(result)
    restarts = print_workers(result)
    print_log(runtime, result)

    total = sum(kind.sent for kind in kinds.values())
    bad = sum(kind.sent for kind in kinds.values() if not kind.good)
    unexpected = sum(kind.unexpected for kind in kinds.values())
    accepted = sum(kind.accepted for kind in kinds.values())
    growth, grower = max(growths, default=(0.0, "no process"))
    reasons = []
    if unexpected:
        reasons.append(f"{unexpected} unexpected errors")
    if accepted:
        reasons.append(f"{accepted} bad requests answered 2xx")
    if restarts:
        reasons.append(f"{restarts:.0f} worker restarts")
    if result.exited is not None:
        reasons.append(f"the runtime exited by itself (status {result.exited})")
    if result.leftovers:
        reasons.append(f"{len(result.leftovers)} processes outlived the runtime by {LINGER:.0f}s")
    if growth >= args.max_growth:
        reasons.append(f"RSS of {grower} grew {growth:.1f}% >= {args.max_growth:g}%")
    if reasons:
        print("\nFAIL: " + "; ".join(reasons))
    else:
        print(
            f"\nPASS: 0 unexpected errors in {total} requests ({bad} bad), 0 worker restarts, "
            f"max RSS growth {growth:.1f}% < {args.max_growth:g}% ({grower})"
        )


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad requests")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="seconds (default 10%% of the run, 30 s+)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth %% that fails")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--exclude", metavar="REGEX", help="leave out the kinds it finds in")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(max(args.duration * 0.1, 30.0), args.duration / 2)

    excluded = [n for n in [*GOOD, *BAD] if args.exclude and re.search(args.exclude, n)]
    runtime = Runtime()
    print("$ " + " ".join(runtime.command).replace(f"{REPO}/", ""))
    print(
        f"soak: {args.duration:.0f}s, concurrency {args.concurrency}, bad fraction "
        f"{args.bad_fraction:g}, warm-up {args.warmup:.0f}s, {os.cpu_count()} CPUs; "
        f"runtime pid {runtime.process.pid} at {runtime.url}",
        flush=True,
    )
    if excluded:
        print(f"left out (--exclude): {'; '.join(excluded)}")
    try:
        result = run(soak(args, runtime))
        result.exited = runtime.process.poll()
        result.log_during = len(runtime.noteworthy)
        tree = process_tree(runtime.process.pid, runtime.models)
    finally:
        runtime.stop()
    stopped = time.monotonic()
    alive = [p for p in tree.values() if p.role != "runtime"]
    while alive and time.monotonic() - stopped < LINGER:
        time.sleep(0.1)
        alive = [p for p in alive if (fields := _stat(p.pid)) and fields[19] == p.started]
        result.lingered = time.monotonic() - stopped
    result.leftovers = alive
    report(args, runtime, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
