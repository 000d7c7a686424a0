"""The scheduler: per-model queues, autoscaling, placement and eviction, and the controller.

``policy`` and ``autoscaler`` are pure (a clock reading and a view of the node in, decisions
out); ``models`` holds each model's queue and replicas; ``controller`` applies decisions.
"""

from __future__ import annotations

from omni_runtime.scheduler.autoscaler import Autoscaler, ScaleTarget
from omni_runtime.scheduler.controller import Controller, host_budget
from omni_runtime.scheduler.models import ModelState, ModelStats, Replica, ServedModel
from omni_runtime.scheduler.policy import (
    Blocked,
    Decision,
    ModelView,
    NodeView,
    ParkReplica,
    Policy,
    ReplicaState,
    ReplicaView,
    SchedulerPolicy,
    StartReplica,
    StopReplica,
    WakeReplica,
)
from omni_runtime.scheduler.queue import ModelBusy, ModelUnavailable, Priority, RequestQueue

__all__ = [
    "Autoscaler",
    "Blocked",
    "Controller",
    "Decision",
    "ModelBusy",
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
