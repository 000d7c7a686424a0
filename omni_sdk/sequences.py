"""Sequences, as Triton's sequence batcher has them: a stateful model's requests carry a
sequence id and start and end flags, every request of one sequence reaches the same replica,
and the runtime fills the model's *control inputs* from them.

    [model.sequence]              # a zero-code package; [models."X".sequence] for any model
    start = "START"               # 1 on a sequence's first request, else 0
    end = "END"                   # 1 on its last request, else 0
    ready = "READY"               # 1 on every request of a sequence
    correlation_id = "CORRID"     # the sequence's id
    idle_timeout = "5s"           # a sequence with no request for this long is ended

A request names its place in its sequence with the v2 parameters ``sequence_id`` (an integer
or a string; 0 and "" mean none), ``sequence_start`` and ``sequence_end`` (booleans). This
module is a contract between the runtime (which routes by the id) and the worker (which fills
the control inputs): both read the parameters with ``read_sequence``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from omni_sdk.units import Seconds

__all__ = [
    "MAX_ID_LENGTH",
    "SequenceControls",
    "SequenceError",
    "SequenceId",
    "control_values",
    "read_sequence",
]

SequenceId = int | str
MAX_ID_LENGTH = 256  # characters of a string sequence_id
_MAX_ID = (1 << 64) - 1  # Triton's correlation ids are uint64 or strings


class SequenceError(ValueError):
    """A request's sequence parameters are malformed; the message names the parameter."""


class SequenceControls(BaseModel):
    """``[model.sequence]``: the control inputs the runtime fills, and how long an idle
    sequence lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str | None = Field(
        default=None, description="input set to 1 on a sequence's first request"
    )
    end: str | None = Field(default=None, description="input set to 1 on a sequence's last request")
    ready: str | None = Field(default=None, description="input set to 1 on every request")
    correlation_id: str | None = Field(default=None, description="input set to the sequence's id")
    idle_timeout: Seconds = Field(
        default=5.0,
        gt=0,
        description="a sequence with no request for this long is ended, e.g. '5s'",
    )
    max_sequences: int = Field(
        default=1000, ge=1, description="sequences live at once per model; more get 429"
    )

    def inputs(self) -> dict[str, str]:
        """The control inputs it names: input name → control (start, end, ready, correlation_id)."""
        controls = ("start", "end", "ready", "correlation_id")
        return {getattr(self, c): c for c in controls if getattr(self, c) is not None}


def read_sequence(parameters: Any) -> tuple[SequenceId, bool, bool] | None:
    """``(sequence_id, sequence_start, sequence_end)`` from a request's v2 parameters; None when
    the request is not part of a sequence. ``SequenceError`` when a parameter is malformed."""
    if not isinstance(parameters, dict):
        return None
    sequence_id = parameters.get("sequence_id")
    start = parameters.get("sequence_start", False)
    end = parameters.get("sequence_end", False)
    if sequence_id is None and start is False and end is False:
        return None
    for name, flag in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(flag, bool):
            raise SequenceError(f"parameter '{name}' must be true or false, got {flag!r}")
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str | None):
        raise SequenceError(
            f"parameter 'sequence_id' must be an integer or a string, got {sequence_id!r}"
        )
    if sequence_id is None or sequence_id == 0 or sequence_id == "":
        if start or end:
            raise SequenceError(
                "parameters 'sequence_start' and 'sequence_end' need a 'sequence_id'"
            )
        return None
    if isinstance(sequence_id, int) and not 0 < sequence_id <= _MAX_ID:
        raise SequenceError(f"parameter 'sequence_id' must be from 1 to 2**64-1, got {sequence_id}")
    if isinstance(sequence_id, str) and len(sequence_id) > MAX_ID_LENGTH:
        raise SequenceError(
            f"parameter 'sequence_id' is {len(sequence_id)} characters long, more than "
            f"{MAX_ID_LENGTH}"
        )
    return sequence_id, start, end


def control_values(
    controls: SequenceControls, sequence_id: SequenceId, start: bool, end: bool
) -> dict[str, SequenceId]:
    """The value of each control input for one request: input name → 1/0, or the id."""
    values: dict[str, SequenceId] = {}
    for name, control in controls.inputs().items():
        if control == "correlation_id":
            values[name] = sequence_id
        elif control == "start":
            values[name] = int(start)
        elif control == "end":
            values[name] = int(end)
        else:
            values[name] = 1
    return values
