"""``/v2/repository/models/{name}/rollout`` (admin token): start a rollout of a new version
(POST, 202 and its state), read its state (GET), abort it (DELETE). See
``scheduler/rollout.py`` for what a rollout does."""

from __future__ import annotations

import json

from omni_runtime.scheduler import ModelHandle
from omni_runtime.scheduler.rollout import RolloutError, Rollouts
from omni_runtime.server.http import HTTPError, Receive, Scope, Send, read_body, respond_json

__all__ = ["RolloutRoutes"]


class RolloutRoutes:
    def __init__(self, rollouts: Rollouts | None, max_body: int) -> None:
        self.rollouts = rollouts
        self.max_body = max_body

    def _manager(self) -> Rollouts:
        if self.rollouts is None:
            raise HTTPError(404, "this runtime does not roll out versions")
        return self.rollouts

    async def start(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        manager = self._manager()
        body = await read_body(scope, receive, self.max_body)
        try:
            request = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise HTTPError(
                400, f"model '{model.name}': the body is not valid JSON: {exc}"
            ) from None
        try:
            rollout = await manager.start(model.name, request)
        except RolloutError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        await respond_json(send, rollout.to_json(), 202)

    async def status(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        rollout = self._manager().rollouts.get(model.name)
        if rollout is None:
            raise HTTPError(404, f"model '{model.name}' has had no rollout")
        await respond_json(send, rollout.to_json())

    async def abort(self, scope: Scope, receive: Receive, send: Send, model: ModelHandle) -> None:
        try:
            rollout = await self._manager().abort(model.name)
        except RolloutError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        await respond_json(send, rollout.to_json())
