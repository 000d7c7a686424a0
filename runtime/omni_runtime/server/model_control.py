"""Model control as Triton's explicit mode takes it: a load request's ``config`` override,
applied where Omni can honour it and refused, naming the field, where it cannot.

Honoured: ``instance_group[].count`` (the model's ``scaling.max_replicas``). Accepted when
they say what the model already is: ``name``, ``platform``, ``backend``, ``max_batch_size``,
``input``, ``output``. Anything else is refused. Model files sent with the request
(``file:...`` parameters) are served by ``model_files.py``.
"""

from __future__ import annotations

import json
from typing import Any

from omni_runtime.discovery import ModelSpec

__all__ = ["ControlError", "config_tensor", "scaling_override", "sequence_batching"]

_SAME_AS_NOW = ("name", "platform", "backend", "max_batch_size", "input", "output")


class ControlError(ValueError):
    """A load request Omni cannot honour; the message says which field and why."""


def scaling_override(spec: ModelSpec, parameters: Any) -> dict[str, Any]:
    """The ``scaling`` fields a load request's parameters change (``{}``: none)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ControlError("'parameters' must be an object")
    files = sorted(k for k in parameters if str(k).startswith("file:"))
    if files:  # (server/model_files.py serves them, where the node allows it)
        raise ControlError(f"model files sent with the load request ({', '.join(files)})")
    unknown = sorted(set(parameters) - {"config"})
    if unknown:
        raise ControlError(f"unknown load parameter(s) {unknown}; Omni takes 'config'")
    if "config" not in parameters:
        return {}
    config = parameters["config"]
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as exc:
            raise ControlError(f"'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ControlError("'config' must be a JSON object (a model configuration)")
    now = _current(spec)
    for field in _SAME_AS_NOW:
        if field in config and config[field] != now[field]:
            raise ControlError(
                f"config field '{field}' is {config[field]!r}, but the model's is "
                f"{now[field]!r}; Omni cannot change it at load (roll out a new package)"
            )
    others = sorted(set(config) - set(_SAME_AS_NOW) - {"instance_group"})
    if others:
        raise ControlError(
            f"config field(s) {others} cannot be honoured by Omni; it applies "
            "instance_group[].count (the model's replicas) and checks name, platform, backend, "
            "max_batch_size, input and output"
        )
    update: dict[str, Any] = {}
    groups = config.get("instance_group")
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ControlError("config field 'instance_group' must be a list of objects")
        counts = [g.get("count", 1) for g in groups]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise ControlError("config field 'instance_group[].count' must be a whole number >= 1")
        update["max_replicas"] = max(sum(counts), spec.scaling.min_replicas, 1)
    return update


def _current(spec: ModelSpec) -> dict[str, Any]:
    """The fields of the model's own configuration (as ``/config`` shows them)."""
    return {
        "name": spec.name,
        "platform": "omni",
        "backend": "omni",
        "max_batch_size": spec.max_batch_size,
        "input": [config_tensor(t, spec.batch_dimension) for t in spec.inputs],
        "output": [config_tensor(t, spec.batch_dimension) for t in spec.outputs],
    }


_CONTROL_KINDS = {
    "start": "CONTROL_SEQUENCE_START",
    "end": "CONTROL_SEQUENCE_END",
    "ready": "CONTROL_SEQUENCE_READY",
    "correlation_id": "CONTROL_SEQUENCE_CORRID",
}


def sequence_batching(spec: ModelSpec) -> dict[str, Any] | None:
    """Triton's ``sequence_batching`` of a sequence model's config (its idle timeout and the
    control inputs the runtime fills); None for any other model."""
    if spec.sequence is None:
        return None
    return {
        "max_sequence_idle_microseconds": int(spec.sequence.idle_timeout * 1_000_000),
        "control_input": [
            {"name": name, "control": [{"kind": _CONTROL_KINDS[control]}]}
            for name, control in spec.sequence.inputs().items()
        ],
    }


def config_tensor(t: dict[str, Any], batched: bool = False) -> dict[str, Any]:
    """A tensor as ``/config`` shows it; ``batched``: dimension 0 is the batch, left out of
    ``dims`` as Triton leaves it out when ``max_batch_size`` is set."""
    datatype = "STRING" if t["datatype"] == "BYTES" else t["datatype"]
    dims = t["shape"][1:] if batched else t["shape"]
    entry = {"name": t["name"], "data_type": f"TYPE_{datatype}", "dims": dims}
    if t.get("optional"):
        entry["optional"] = True
    return entry
