"""A plain single-process Starlette app that calls the trivial engines in-process.

The baseline of bench/overhead.py: the same v2 decoding, validation and encoding code as an
Omni worker (omni_sdk._serving.EngineRunner), with no process boundary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).parent / "packages" / "trivial"))

from omni_bench_trivial import Trivial, TrivialValue, TrivialValues

from omni_sdk._serving import EngineRunner

runners = {e.name: EngineRunner(e()) for e in (Trivial, TrivialValue, TrivialValues)}


async def infer(request: Request) -> Response:
    runner = runners[request.path_params["name"]]
    header_length = int(request.headers.get("inference-header-content-length", 0))
    prepared = runner.prepare_v2(await request.body(), header_length)
    status, _, parts = runner.respond(prepared, runner.run([prepared])[0])
    return Response(b"".join(parts), status_code=status, media_type="application/json")


app = Starlette(routes=[Route("/v2/models/{name:path}/infer", infer, methods=["POST"])])
