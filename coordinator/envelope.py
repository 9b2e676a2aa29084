"""Wire messages: every stream entry carries one of these, msgpack-encoded in one field.

Schemas evolve by appending fields with defaults; unknown fields are ignored on decode so old
nodes keep working during rolling upgrades. The user payload stays ``msgspec.Raw`` (already
encoded msgpack) so routing, claiming and dead-lettering never decode user data.
"""

from __future__ import annotations

from typing import Any

import msgspec

MULTI_AGENT_SYNC = "multiagent:sync"


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="msg"):
    """A message to an agent inbox or a topic."""

    id: str
    type: str = MULTI_AGENT_SYNC
    target: str
    sender: str | None = None
    sender_node: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    created_ms: int
    deadline_ms: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    headers: dict[str, str] = {}
    payload: msgspec.Raw = msgspec.Raw(b"\xc0")


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="reply"):
    """The answer to a request, written to the requesting node's reply stream."""

    correlation_id: str
    sender: str
    sender_node: str
    created_ms: int
    ok: bool = True
    error_type: str | None = None
    error: str | None = None
    payload: msgspec.Raw = msgspec.Raw(b"\xc0")


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="node"):
    """What a node writes with each heartbeat."""

    node_id: str
    host: str
    pid: int
    agents: list[str]
    topics: dict[str, list[str]] = {}
    started_ms: int
    beat_ms: int
    concurrency: int = 0
    version: str = ""


class AgentEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="event"):
    """A lifecycle event on the events stream (``type`` is one of ``AgentEventType``).

    ``message_id`` is the message the agent was handling; ``stream_id`` is filled in when the
    event is read back (it is the position to resume from) and empty when written.
    """

    id: str
    type: str
    agent_id: str | None = None
    node_id: str | None = None
    session_id: str | None = None
    message_id: str | None = None
    created_ms: int
    traceparent: str | None = None
    data: dict[str, Any] = {}
    stream_id: str = ""


class PackedEvent(msgspec.Struct, frozen=True, array_like=True):
    """One event inside an :class:`EventBatch`, as a msgpack array (no field names: a node
    writes thousands per second). ``id`` is empty for events named after their batch."""

    type: str
    agent_id: str | None
    node_id: str | None
    session_id: str | None
    message_id: str | None
    created_ms: int
    traceparent: str | None = None
    data: dict[str, Any] = {}
    id: str = ""


class EventBatch(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="events"):
    """Several lifecycle events in one stream entry, in the order they were published.

    A node appends what it published since its last write as one entry: one stream append per
    batch instead of one per event. Readers see individual events: event ``i`` of the entry
    ``ms-seq`` has the position ``ms-seq.i`` and, when published without an id, the id
    ``<batch id>.<i>``.
    """

    id: str
    events: list[PackedEvent] = []


WireMessage = Envelope | Reply | NodeInfo | AgentEvent | EventBatch
