"""A worker agent that does some (simulated) work per message and reports what it did.

Payload: ``{"n": int, "work_ms": int, "report_to": agent_id}``. After the work it sends
``{"n": ..., "node": ...}`` to ``report_to``, so another agent can count that every message was
handled, where, and how many times.
"""

from __future__ import annotations

import collections
from typing import Any

import anyio

from coordinator import Context, Message


class Counter:
    """Counts messages per session; replies with the running count."""

    agent_id = "counter"

    def __init__(self) -> None:
        self.per_session: collections.Counter[str] = collections.Counter()

    async def handle(self, message: Message, context: Context) -> dict[str, Any]:
        payload = message.payload if isinstance(message.payload, dict) else {}
        work_ms = int(payload.get("work_ms", 0))
        if work_ms:
            await anyio.sleep(work_ms / 1000)
        self.per_session[message.session_id or ""] += 1
        report_to = payload.get("report_to")
        if report_to:
            await context.send(report_to, {"n": payload.get("n"), "node": context.node_id})
        return {"count": self.per_session[message.session_id or ""], "node": context.node_id}
