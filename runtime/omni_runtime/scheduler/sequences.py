"""Sequences of a stateful model (Triton's sequence batcher): every request of a sequence goes
to the replica that its first request went to, and a sequence with no request for
``sequence.idle_timeout`` ends.

Only a model with ``[model.sequence]`` (``spec.sequence``) has a ``Sequences``; its v2 requests'
parameters are read here to route them. Any other model's requests pass untouched, and its
worker refuses sequence parameters with a 400. The worker fills the control inputs from the
same parameters (``omni_sdk.sequences``).

A replica with a live sequence counts as busy, so it is neither scaled away nor evicted while
the sequence lives. A sequence whose replica went away anyway (its worker died) gets a 503
saying its state is gone; it never continues silently on another replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable, Priority
from omni_runtime.scheduler.views import ReplicaState
from omni_sdk.envelopes import ai_error_body, v2_error_body
from omni_sdk.sequences import SequenceControls, SequenceError, SequenceId, read_sequence
from omni_sdk.wire import V2_PREFIX, Kind

if TYPE_CHECKING:
    from omni_runtime.scheduler.backend import Response
    from omni_runtime.scheduler.models import ServedModel
    from omni_runtime.scheduler.replica import Replica

__all__ = ["Sequences"]

log = logging.getLogger("omni.scheduler")
_V2_KINDS = (Kind.INFER_V2, Kind.STREAM_V2)


class _Live:
    """One live sequence: the replica it is pinned to (once its first request has one)."""

    __slots__ = ("ended", "pinned", "replica", "timer")

    def __init__(self, pinned: asyncio.Future[Replica]) -> None:
        self.pinned = pinned
        self.replica: Replica | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False


class Sequences:
    """A sequence model's live sequences, by id, and how each request of one is routed."""

    def __init__(self, model: ServedModel, controls: SequenceControls) -> None:
        self.model = model
        self.controls = controls
        self.live: dict[SequenceId, _Live] = {}

    async def call(
        self,
        kind: int,
        parts: list[bytes],
        priority: Priority,
        on_chunk: Callable[[bytes], None] | None,
    ) -> Response:
        """``ServedModel.call`` for a sequence model: 400 for a request that is not part of a
        live sequence (or starts one), else its sequence's replica."""
        name = self.model.name
        if kind not in _V2_KINDS:
            message = (
                f"model '{name}' keeps state per sequence: send its requests over KServe v2 "
                f"(/v2/models/{name}/infer or gRPC) with the parameter 'sequence_id'"
            )
            return 400, 0, ai_error_body(400, message)
        try:
            found = read_sequence(_parameters(parts))
        except (SequenceError, ValueError, RecursionError) as exc:
            return _refused(f"model '{name}': {exc}")
        if found is None:
            return _refused(
                f"model '{name}' keeps state per sequence: every request needs the parameter "
                "'sequence_id' (and 'sequence_start' on a sequence's first request)"
            )
        sequence_id, start, end = found
        if start:
            return await self._start(sequence_id, end, kind, parts, priority, on_chunk)
        live = self.live.get(sequence_id)
        if live is None:
            return _refused(
                f"model '{name}': sequence {sequence_id!r} is not live (it ended, it had no "
                f"request for {self.controls.idle_timeout:g}s (sequence.idle_timeout), or it "
                "never started): send its first request with 'sequence_start'"
            )
        model = self.model
        if model.unloading or not model.wanted or model.closing:
            raise model.unavailable()
        replica = live.replica
        if replica is None:  # its first request is still waiting for one
            replica = await asyncio.shield(live.pinned)
        if (
            replica.state is not ReplicaState.READY
            or replica.worker.returncode is not None
            or replica not in model.replicas
        ):
            self._end(sequence_id, live)
            raise ModelUnavailable(
                f"model '{name}': sequence {sequence_id!r} lived on replica {replica.id}, which "
                "is gone, and its state with it: start the sequence again ('sequence_start')"
            )
        if replica.in_flight >= replica.capacity + model.queue.limit:  # as a full queue
            raise ModelBusy(
                f"model '{name}': sequence {sequence_id!r}'s replica {replica.id} has "
                f"{replica.in_flight} requests in flight, its limit (its room and "
                "scaling.max_queue_size); try again shortly"
            )
        if end:
            self._end(sequence_id, live)
        else:
            self._touch(sequence_id, live)
        model.arrived += 1
        model._reserve(replica)
        try:
            return await model._send(replica, kind, parts, on_chunk)
        finally:
            if not end:
                self._touch(sequence_id, live)  # idle from its answer on, not its arrival

    async def _start(
        self,
        sequence_id: SequenceId,
        end: bool,
        kind: int,
        parts: list[bytes],
        priority: Priority,
        on_chunk: Callable[[bytes], None] | None,
    ) -> Response:
        """A sequence's first request (a restart, for an id that is live): any replica with
        room, which the sequence keeps."""
        model = self.model
        old = self.live.get(sequence_id)
        if old is not None:
            self._end(sequence_id, old)
        if model.unloading or not model.wanted or model.closing or model.backing_off():
            raise model.unavailable()
        if not end and len(self.live) >= self.controls.max_sequences:
            raise ModelBusy(
                f"model '{model.name}' has {len(self.live)} live sequences, its limit "
                "(sequence.max_sequences); end some, or wait for idle ones to time out"
            )
        model.arrived += 1
        live = None
        if not end:  # (a one-request sequence pins nothing)
            live = _Live(asyncio.get_running_loop().create_future())
            self.live[sequence_id] = live
        try:
            replica = None if model.queue else model._free_replica()
            if replica is None:
                replica = await model._wait(priority)
            else:
                model._reserve(replica)
        except BaseException as exc:
            if live is not None:
                self._end(sequence_id, live, f"got no replica: {exc or type(exc).__name__}")
            raise
        if live is not None and not live.ended:
            live.replica = replica
            replica.sequences += 1
            live.pinned.set_result(replica)
            self._touch(sequence_id, live)
        return await model._send(replica, kind, parts, on_chunk)

    def _touch(self, sequence_id: SequenceId, live: _Live) -> None:
        """(Re)start the sequence's idle timer."""
        if live.ended:
            return
        if live.timer is not None:
            live.timer.cancel()
        loop = asyncio.get_running_loop()
        live.timer = loop.call_later(self.controls.idle_timeout, self._expire, sequence_id, live)

    def _expire(self, sequence_id: SequenceId, live: _Live) -> None:
        if live.ended:
            return
        log.info(
            "model '%s': sequence %r ended: no request for %gs (sequence.idle_timeout)",
            self.model.name, sequence_id, self.controls.idle_timeout,
        )  # fmt: skip
        self._end(sequence_id, live)

    def _end(self, sequence_id: SequenceId, live: _Live, why: str = "ended") -> None:
        if live.ended:
            return
        live.ended = True
        if not live.pinned.done():  # its first request never reached a replica
            live.pinned.set_exception(
                ModelUnavailable(
                    f"model '{self.model.name}': sequence {sequence_id!r} {why} before its "
                    "first request reached a replica"
                )
            )
            live.pinned.exception()  # (read: nobody may be waiting for it)
        if self.live.get(sequence_id) is live:
            del self.live[sequence_id]
        if live.timer is not None:
            live.timer.cancel()
        if live.replica is not None:
            live.replica.sequences -= 1

    def close(self) -> None:
        """End every sequence (the model is going away)."""
        for sequence_id, live in list(self.live.items()):
            self._end(sequence_id, live)


def _parameters(parts: list[bytes]) -> object:
    """The ``parameters`` of a v2 request's JSON header (V2_PREFIX, then the body)."""
    if len(parts) == 2 and len(parts[0]) == V2_PREFIX.size:
        (header_length,) = V2_PREFIX.unpack(parts[0])
        body = memoryview(parts[1])
    else:
        data = memoryview(b"".join(parts))
        (header_length,) = V2_PREFIX.unpack_from(data)
        body = data[V2_PREFIX.size :]
    try:
        header = json.loads(bytes(body[: header_length or len(body)]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the inference header is not valid JSON: {exc}") from None
    return header.get("parameters") if isinstance(header, dict) else None


def _refused(message: str) -> Response:
    return 400, 0, v2_error_body(message)
