"""Agents served by the node processes of tests/coordinator/test_nodes.py.

Each one reports what it handled to the agent named in the payload's ``report_to`` (the test's
own agent), so the test sees every handling, where it ran, and how many times.
"""

from __future__ import annotations

from typing import Any

import anyio

from coordinator import Context, Message
from coordinator.agent import Registration


async def _report(message: Message, context: Context, **extra: Any) -> None:
    payload = message.payload if isinstance(message.payload, dict) else {}
    report_to = payload.get("report_to")
    if report_to:
        await context.send(report_to, {"id": message.id, "n": payload.get("n"),
                                       "agent": context.agent_id, "node": context.node_id,
                                       **extra})


async def recorder(message: Message, context: Context) -> dict[str, Any]:
    """Sleeps ``work_ms``, reports the message id, replies with the payload."""
    payload = message.payload if isinstance(message.payload, dict) else {}
    work_ms = int(payload.get("work_ms", 0))
    if work_ms:
        await anyio.sleep(work_ms / 1000)
    await _report(message, context)
    return {"got": payload.get("n"), "node": context.node_id}


async def failing(message: Message, context: Context) -> None:
    """Always raises, so requests end in a RemoteError and messages in the dead letters."""
    raise ValueError(f"cannot handle {message.payload!r}")


async def _news(message: Message, context: Context) -> None:
    await _report(message, context)


def news_a() -> list[Registration]:
    """Agent ``sub-a`` subscribed to topic ``news``."""
    return [Registration("sub-a", _news, topic="news")]


def news_b() -> list[Registration]:
    """Agent ``sub-b`` subscribed to topic ``news``."""
    return [Registration("sub-b", _news, topic="news")]
