"""``omni-runtime rollout``: replace a served model by a new version, from the command line.

It asks a running runtime (``--url``, default http://127.0.0.1:8000) through
``/v2/repository/models/{name}/rollout``, with ``OMNI_ADMIN_TOKEN`` when it is set, and
follows the rollout until it ends (``--no-wait`` returns once it started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

__all__ = ["rollout"]

FINISHED = ("promoted", "rolled_back", "failed", "aborted")


def rollout(args: argparse.Namespace) -> int:
    import httpx

    token = os.environ.get("OMNI_ADMIN_TOKEN") or os.environ.get("OMNI_API_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    url = f"{args.url.rstrip('/')}/v2/repository/models/{quote(args.name, safe='/@')}/rollout"
    try:
        with httpx.Client(headers=headers, timeout=300) as client:
            if args.status:
                return _show(client.get(url))
            if args.abort:
                return _show(client.delete(url))
            body: dict[str, Any] = {"auto_rollback": not args.no_auto_rollback}
            if args.to:
                body["to"] = args.to
            else:
                body["package"] = str(args.package.resolve())
            if args.canary is not None:
                body["canary_percent"] = args.canary
            if args.watch is not None:
                body["watch"] = args.watch
            answer = client.post(url, json=body)
            if answer.status_code != 202 or args.no_wait:
                return _show(answer)
            state = answer.json()
            seen = state["state"]
            print(
                f"rollout of {args.name}: {state['from_version']} -> {state['to_version']}: {seen}"
            )
            while state["state"] not in FINISHED:
                time.sleep(0.5)
                state = client.get(url).json()
                if state["state"] != seen:
                    seen = state["state"]
                    reason = f" ({state['reason']})" if state.get("reason") else ""
                    print(f"rollout of {args.name}: {seen}{reason}", flush=True)
            return 0 if state["state"] == "promoted" else 1
    except httpx.HTTPError as exc:
        print(f"omni-runtime rollout: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2


def _show(answer: Any) -> int:
    try:
        value = answer.json()
    except ValueError:
        value = answer.text
    if answer.status_code >= 400:
        message = value.get("error", value) if isinstance(value, dict) else value
        print(f"omni-runtime rollout: {message}", file=sys.stderr)
        return 1
    print(json.dumps(value, indent=2))
    return 0
