"""The scheduler: per-model queues, autoscaling, placement and eviction, and the controller.

``policy`` and ``autoscaler`` are pure (a clock reading and a view of the node in, decisions
out: ``views`` and ``decisions``; ``placement`` does the memory arithmetic) and import nothing
of the live runtime; ``models`` holds each model's queue and replicas (``replica``);
``controller`` applies decisions through its ``actuator`` and a workers backend (``backend``),
live or simulated.
``handle`` is all the front ends see of a model (call, state, description, statistics).
The controller and the models are imported on first use, so the policy stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from omni_runtime.scheduler.autoscaler import Autoscaler, ScaleTarget
from omni_runtime.scheduler.decisions import (
    Blocked,
    Decision,
    ParkReplica,
    StartReplica,
    StopReplica,
    WakeReplica,
)
from omni_runtime.scheduler.handle import ModelDirectory, ModelHandle
from omni_runtime.scheduler.policy import Policy, SchedulerPolicy
from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable, Priority, RequestQueue
from omni_runtime.scheduler.views import ModelView, NodeView, ReplicaState, ReplicaView

if TYPE_CHECKING:
    from omni_runtime.scheduler.controller import Controller, host_budget
    from omni_runtime.scheduler.models import ModelState, ServedModel
    from omni_runtime.scheduler.replica import Replica
    from omni_runtime.scheduler.stats import ModelStats

_LAZY = {
    "Controller": "controller",
    "host_budget": "controller",
    "ModelState": "models",
    "ModelStats": "stats",
    "Replica": "replica",
    "ServedModel": "models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omni_runtime.scheduler' has no attribute {name!r}")
    return getattr(importlib.import_module(f"omni_runtime.scheduler.{module}"), name)


__all__ = [
    "Autoscaler",
    "Blocked",
    "Controller",
    "Decision",
    "ModelBusy",
    "ModelDirectory",
    "ModelHandle",
    "ModelState",
    "ModelStats",
    "ModelUnavailable",
    "ModelView",
    "NodeView",
    "ParkReplica",
    "Policy",
    "Priority",
    "Replica",
    "ReplicaState",
    "ReplicaView",
    "RequestQueue",
    "ScaleTarget",
    "SchedulerPolicy",
    "ServedModel",
    "StartReplica",
    "StopReplica",
    "WakeReplica",
    "host_budget",
]
