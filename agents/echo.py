"""The simplest agent: replies with what it got and where it ran."""

from __future__ import annotations

from typing import Any

from coordinator import Context, Message


async def echo(message: Message, context: Context) -> dict[str, Any]:
    """Reply with the payload, the node that handled it and the delivery count."""
    return {"echo": message.payload, "node": context.node_id, "deliveries": message.deliveries}
