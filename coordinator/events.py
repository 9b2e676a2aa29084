"""Lifecycle events: what agents did (started, completed, failed, sent, called a tool), written
to one durable stream so any process can follow, replay or consume them as a group.

Publishing never holds up an agent: events go through a bounded buffer to a background task
that appends them in batches; when the buffer is full an event is dropped and counted (unless
the publisher was built with ``block=True``). Reading is either a plain tail (``XREAD``, with
replay from any position or time) or a durable consumer group (at least once, catches up).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Collection
from datetime import datetime, timezone
from enum import StrEnum

import anyio
import anyio.abc
import msgspec

from . import codec
from .envelope import AgentEvent, Envelope
from .errors import CodecError, ConfigError, TransportError
from .producer import new_message_id
from .registry import now_ms
from .transport import StreamTransport
from .publishing import BufferedPublisher

__all__ = ["EVENTS_TOPIC", "AgentEvent", "AgentEventType", "EventPublisher", "after_id",
           "event_envelope", "make_event", "matches", "read_events"]

log = logging.getLogger(__name__)

#: The pseudo topic under which durable event subscriptions are registered (no real topic can
#: be named so: braces are refused in names).
EVENTS_TOPIC = "{events}"
#: The largest sequence number of a stream id: ``ms-MAX`` is the last id of a millisecond.
_MAX_SEQ = 18446744073709551615
_STREAM_ID = re.compile(r"^\d+-\d+$")


class AgentEventType(StrEnum):
    """The lifecycle event types (plain strings on the wire)."""

    STARTED = "agent:started"
    COMPLETED = "agent:completed"
    FAILED = "agent:failed"
    MESSAGE = "agent:message"
    TOOL_CALL = "agent:tool_call"
    TOOL_RESULT = "agent:tool_result"
    MULTI_AGENT_SYNC = "multiagent:sync"


def make_event(type: str, agent_id: str | None, node_id: str | None,
               about: Envelope | None, data: dict[str, object] | None = None,
               created_ms: int | None = None) -> AgentEvent:
    """A new event of an agent on a node, about the message ``about`` (session and trace
    context carry over from it); ``created_ms`` defaults to now."""
    return AgentEvent(id=new_message_id(), type=str(type), agent_id=agent_id, node_id=node_id,
                      session_id=about.session_id if about else None,
                      message_id=about.id if about else None,
                      created_ms=now_ms() if created_ms is None else created_ms,
                      traceparent=about.traceparent if about else None, data=data or {})


class EventPublisher(BufferedPublisher):
    """Appends lifecycle events to the events stream from a bounded buffer, in batches.

    :param stream: the events stream key (``Keys.events()``)
    :param capacity: events buffered at most; beyond that they are dropped (and counted)
    :param block: wait for buffer space instead of dropping (stalls the publishing agent)
    :param enabled: False publishes nothing (``publish_events: false``)
    :param batch_size: events appended per pipelined round trip at most
    :param timeout_ms: give up on one batch after this long
    """

    def __init__(self, stream: str, *, capacity: int = 10_000, block: bool = False,
                 enabled: bool = True, batch_size: int = 500, timeout_ms: int = 5_000) -> None:
        super().__init__(enabled=enabled, capacity=capacity, batch_size=batch_size,
                         timeout_ms=timeout_ms)
        self.stream = stream
        self.block = block

    def publish_nowait(self, event: AgentEvent) -> bool:
        """Queue ``event`` without waiting; False when it was dropped (full, closed, disabled,
        or data msgpack cannot carry). Never raises."""
        if not self.enabled:
            return False
        try:
            data = codec.encode_event(event)
        except CodecError as exc:
            log.warning("event %s dropped: %s", event.type, exc)
            self.dropped += 1
            return False
        return self._offer(self.stream, data)

    async def publish(self, event: AgentEvent) -> bool:
        """Queue ``event``; waits for buffer space only when built with ``block=True``."""
        if self.block and self.enabled:
            await self._wait_for_space()
        return self.publish_nowait(event)

    async def _write(self, transport: StreamTransport, by_key: dict[str, list[bytes]]) -> None:
        batch = by_key.get(self.stream, [])
        for attempt in range(3):
            try:
                with anyio.fail_after(self._timeout_s):
                    await transport.add_many(self.stream, batch)
            except (TransportError, TimeoutError) as exc:
                log.warning("writing %d events failed (attempt %d): %s", len(batch),
                            attempt + 1, exc or type(exc).__name__)
                await anyio.sleep(0.1 * 2 ** attempt)
                continue
            self.published += len(batch)
            return
        self.failed += len(batch)


def after_id(since: str | int | None) -> bytes | None:
    """The stream id to read *after* for ``since``; None means "from now on".

    ``since`` is a stream id (``1700000000000-0``, exclusive, as ``XREAD`` takes it), ``"0"``
    for everything, epoch milliseconds (int or digits, inclusive) or an ISO 8601 time
    (inclusive; naive times are UTC).

    :raises ConfigError: when ``since`` is none of those
    """
    if since is None:
        return None
    if isinstance(since, int):
        return _before_ms(since)
    text = since.strip()
    if text in ("0", "0-0", "-"):
        return b"0-0"
    if _STREAM_ID.match(text):
        return text.encode()
    if text.isdigit():
        return _before_ms(int(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"since {since!r}: expected a stream id, '0', epoch milliseconds or "
                          "an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _before_ms(int(moment.timestamp() * 1000))


def _before_ms(ms: int) -> bytes:
    return b"0-0" if ms <= 0 else f"{ms - 1}-{_MAX_SEQ}".encode()


def matches(event: AgentEvent, types: Collection[str] | None, agent_id: str | None,
            session_id: str | None) -> bool:
    """Whether ``event`` passes the filters (None lets everything through)."""
    return ((types is None or event.type in types)
            and (agent_id is None or event.agent_id == agent_id)
            and (session_id is None or event.session_id == session_id))


async def read_events(transport: StreamTransport, stream: str, *, after: bytes | None,
                      follow: bool, block_ms: int = 1_000, count: int = 500
                      ) -> AsyncIterator[AgentEvent]:
    """Events of ``stream`` after the id ``after`` (None: only new ones), each with its
    ``stream_id``; without ``follow`` it ends at the current end of the stream."""
    if after is None:
        last = await transport.range(stream, b"-", b"+", count=1, reverse=True)
        after = last[0].id if last else b"0-0"
        if not follow:
            return
    while True:
        entries = await transport.read(stream, after, count, block_ms if follow else None)
        if not entries and not follow:
            return
        for entry in entries:
            after = entry.id
            try:
                event = codec.decode_event(entry.fields)
            except CodecError as exc:
                log.warning("skipping event entry %s: %s", entry.id.decode(), exc)
                continue
            yield msgspec.structs.replace(event, stream_id=entry.id.decode())


def event_envelope(fields: dict[bytes, bytes] | None) -> Envelope:
    """Decode an event entry for a group consumer: an envelope whose payload is the event.

    :raises CodecError: if the entry is not a well-formed event (it is dead-lettered)
    """
    event = codec.decode_event(fields)
    assert fields is not None
    return Envelope(id=event.id, type=event.type, target="events", sender=event.agent_id,
                    sender_node=event.node_id, session_id=event.session_id,
                    created_ms=event.created_ms, traceparent=event.traceparent,
                    payload=msgspec.Raw(fields[codec.FIELD]))
