"""A worker's output: relayed to the log line by line, whatever it writes, its last lines kept
for the message that says why it ended."""

from __future__ import annotations

import asyncio
import collections
import logging

_LOG_LINE_LIMIT = 16 << 10


async def relay_output(
    stream: asyncio.StreamReader, model: str, log_tail: collections.deque[str]
) -> None:
    """Relay a worker's output to the log, line by line, and keep its last lines in ``log_tail``."""
    model_log = logging.getLogger("omni.model")
    pending = b""
    while chunk := await stream.read(1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) > _LOG_LINE_LIMIT:  # a line without end: cut it rather than hoard it
            lines.append(pending)
            pending = b""
        for raw in lines:
            line = raw[:_LOG_LINE_LIMIT].decode(errors="replace").rstrip()
            if line:
                log_tail.append(line)
                model_log.info("[%s] %s", model, line)
    if pending.strip():
        log_tail.append(pending.decode(errors="replace").rstrip())
        model_log.info("[%s] %s", model, log_tail[-1])
