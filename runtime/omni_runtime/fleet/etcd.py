"""How the fleet's store talks to etcd: aetcd clients with keep-alive pings, which errors
mean an endpoint is lost, and watch streams on aetcd's gRPC stubs."""

from __future__ import annotations

from typing import Any

import aetcd
import aetcd.utils
import grpc

# The channel pings the server every 10 s while a call (a watch) is open, so a connection that
# died silently fails the watch within 15 s; etcd refuses pings more often than every 5 s.
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}
# A watch on a member cut off from its cluster's leader would go quiet; with this, etcd ends it.
REQUIRE_LEADER = (("hasleader", "true"),)
LOST_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class WatchLost(Exception):
    """etcd ended or cancelled a watch stream (not an outage by itself)."""


def address(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def decode_key(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def client(endpoint: tuple[str, int], timeout: float) -> Any:
    """An aetcd client for one endpoint; each of its calls has ``timeout`` as its deadline."""
    host, port = endpoint
    return aetcd.Client(
        host=f"[{host}]" if ":" in host else host,
        port=port,
        timeout=timeout,  # a gRPC deadline: a float does
        options=CHANNEL_OPTIONS,
    )


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the endpoint did not answer (refused, gone, no leader, too slow)."""
    if isinstance(exc, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError | TimeoutError):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in LOST_CODES


def reason(exc: BaseException, timeout: float) -> str:
    """Why an endpoint did not answer, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, grpc.aio.AioRpcError):
        details = str(exc.details() or exc.code().name)
    else:
        details = str(exc) or type(exc).__name__
    if details.startswith("failed to connect to all addresses"):  # "...: Connection refused"
        return details.rpartition(": ")[2]
    return details


async def open_watch(client: Any, prefix: str, start_revision: int) -> Any:
    """A Watch call for the keys under ``prefix`` from ``start_revision`` on, once etcd has
    created it. aetcd's own watcher shares one stream per client and never ends its iterators
    when that stream ends cleanly, so the watch runs on aetcd's stubs, one stream each."""
    await client.connect()
    call = aetcd.rpc.WatchStub(client.channel).Watch(metadata=REQUIRE_LEADER)
    try:
        key = encode_key(prefix)
        create = aetcd.rpc.WatchCreateRequest(
            key=key, range_end=aetcd.utils.prefix_range_end(key), start_revision=start_revision
        )
        await call.write(aetcd.rpc.WatchRequest(create_request=create))
        response = await call.read()
        if response is grpc.aio.EOF or not response.created or response.canceled:
            raise WatchLost(f"etcd did not create the watch ({response})")
    except BaseException:
        call.cancel()
        raise
    return call


async def next_changes(call: Any) -> list[tuple[str, bytes | None]]:
    """The changes of the next watch response that has any: (key, value), value None for a
    deletion; ``WatchLost`` when etcd ends or cancels the watch."""
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise WatchLost("etcd ended the watch")
        if response.canceled or response.compact_revision:
            why = response.cancel_reason or "its history was compacted"
            raise WatchLost(f"etcd cancelled the watch ({why})")
        changes = [
            (decode_key(ev.kv.key), bytes(ev.kv.value) if ev.type == aetcd.rpc.Event.PUT else None)
            for ev in response.events
        ]
        if changes:
            return changes
