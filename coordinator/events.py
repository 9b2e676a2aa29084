"""Lifecycle events: what agents did (started, completed, failed, sent, called a tool), written
to one durable stream so any process can follow, replay or consume them as a group.

Publishing never holds up an agent: events go through a bounded buffer to a background task
that appends what accumulated as one entry (an :class:`EventBatch`); when the buffer is full
an event is dropped and counted (unless the publisher was built with ``block=True``). Reading
is either a plain tail (``XREAD``, with replay from any position or time) or a durable
consumer group (at least once, catches up).

Positions: an event of a batch entry ``ms-seq`` has the position (``stream_id``) ``ms-seq.i``,
its index in the entry; a single-event entry (as older nodes wrote) just ``ms-seq``. Reading
resumes after any of these.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Collection
from datetime import datetime, timezone
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import msgspec

from . import codec
from .envelope import AgentEvent, Envelope, EventBatch, PackedEvent
from .errors import CodecError, ConfigError, TransportError
from .producer import new_message_id
from .registry import now_ms
from .transport import AppendWrite, StreamTransport
from .publishing import BufferedPublisher
from .tailing import tail

if TYPE_CHECKING:
    from .agent import Message

__all__ = ["EVENTS_TOPIC", "AgentEvent", "AgentEventType", "EventPublisher", "after_id",
           "event_envelope", "events_of", "is_position", "make_event", "matches", "read_events",
           "unpack"]

log = logging.getLogger(__name__)

#: The pseudo topic under which durable event subscriptions are registered (no real topic can
#: be named so: braces are refused in names).
EVENTS_TOPIC = "{events}"
#: The largest sequence number of a stream id: ``ms-MAX`` is the last id of a millisecond.
_MAX_SEQ = 18446744073709551615
_POSITION = re.compile(r"^\d+-\d+(\.\d+)?$")


def is_position(text: str) -> bool:
    """Whether ``text`` is an event's position: ``ms-seq``, or ``ms-seq.i`` inside a batch."""
    return _POSITION.match(text) is not None


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


class EventPublisher(BufferedPublisher[bytes]):
    """Appends lifecycle events to the events stream from a bounded buffer: everything
    published since the last write goes out as one :class:`EventBatch` entry.

    Events are queued encoded. Python objects held until their batch is written (a tuple and
    a data dict per event) count towards the garbage collector's young generation: in a busy
    node they made it run ~20 times as often. Bytes do not count.

    :param stream: the events stream key (``Keys.events()``)
    :param capacity: events buffered at most; beyond that they are dropped (and counted)
    :param block: wait for buffer space instead of dropping (stalls the publishing agent)
    :param enabled: False publishes nothing (``publish_events: false``)
    :param batch_size: events per entry at most
    :param timeout_ms: give up on one write after this long
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
        return self._offer_packed((event.type, event.agent_id, event.node_id, event.session_id,
                                   event.message_id, event.created_ms, event.traceparent,
                                   event.data, event.id))

    def publish_about(self, type: str, agent_id: str, node_id: str, about: Envelope,
                      data: dict[str, Any], created_ms: int) -> bool:
        """Queue an event about the message ``about`` without waiting (the node runtime's
        path, once or twice per message): no event object is built, and the event is named
        after its batch. False when dropped, as :meth:`publish_nowait`. Never raises."""
        if not self.enabled:
            return False
        # _offer_packed inlined: this runs twice per message.
        try:
            packed = codec.encode_packed_event((type, agent_id, node_id, about.session_id,
                                                about.id, created_ms, about.traceparent, data,
                                                ""))
        except codec.ENCODE_ERRORS as exc:
            return self._drop(type, exc)
        return self._offer(packed)

    def _offer_packed(self, fields: tuple[Any, ...]) -> bool:
        """Queue the event whose :class:`PackedEvent` fields are ``fields``, in order."""
        try:
            packed = codec.encode_packed_event(fields)
        except codec.ENCODE_ERRORS as exc:
            return self._drop(fields[0], exc)
        return self._offer(packed)

    def _drop(self, type: str, error: Exception) -> bool:
        """Count an event that cannot be encoded (dropped alone here, not with its whole
        batch when written); returns False."""
        log.warning("event %s dropped: cannot be encoded: %s", type, error)
        self.dropped += 1
        return False

    async def wait_for_space(self) -> None:
        """With ``block=True``: return once an event would be queued; else at once."""
        if self.block and self.enabled:
            await self._wait_for_space()

    async def publish(self, event: AgentEvent) -> bool:
        """Queue ``event``; waits for buffer space only when built with ``block=True``."""
        await self.wait_for_space()
        return self.publish_nowait(event)

    async def _write(self, transport: StreamTransport, batch: list[bytes]) -> None:
        data = _entry(batch)
        for attempt in range(3):
            try:
                with anyio.fail_after(self._timeout_s):
                    await transport.add(self.stream, data)
            except (TransportError, TimeoutError) as exc:
                log.warning("writing %d events failed (attempt %d): %s", len(batch),
                            attempt + 1, exc or type(exc).__name__)
                await anyio.sleep(0.1 * 2 ** attempt)
                continue
            self.published += len(batch)
            return
        self.failed += len(batch)

    _rides = True

    def _ride(self, batch: list[bytes]) -> AppendWrite:
        return AppendWrite(self.stream, _entry(batch))


def _entry(batch: list[bytes]) -> bytes:
    """The stream entry data of a batch of events queued encoded."""
    return codec.encode_event_batch(new_message_id(), batch)


def after_id(since: str | int | None) -> bytes | None:
    """The stream id to read *after* for ``since``; None means "from now on".

    ``since`` is a position (``1700000000000-0`` or ``1700000000000-0.3``, exclusive: an
    event's ``stream_id`` resumes after it), ``"0"`` for everything, epoch milliseconds (int
    or digits, inclusive) or an ISO 8601 time (inclusive; naive times are UTC).

    :raises ConfigError: when ``since`` is none of those
    """
    if since is None:
        return None
    if isinstance(since, int):
        return _before_ms(since)
    text = since.strip()
    if text in ("0", "0-0", "-"):
        return b"0-0"
    if is_position(text):
        return text.encode()
    if text.isdigit():
        return _before_ms(int(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"since {since!r}: expected a stream id (as an event's stream_id), "
                          "'0', epoch milliseconds or an ISO 8601 time") from None
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


def unpack(entry_id: str, decoded: AgentEvent | EventBatch) -> list[AgentEvent]:
    """The events of one events-stream entry, each with its position (``stream_id``)."""
    if isinstance(decoded, AgentEvent):
        return [msgspec.structs.replace(decoded, stream_id=entry_id)]
    batch_id = decoded.id
    return [AgentEvent(id=p.id or f"{batch_id}.{i}", type=p.type, agent_id=p.agent_id,
                       node_id=p.node_id, session_id=p.session_id, message_id=p.message_id,
                       created_ms=p.created_ms, traceparent=p.traceparent, data=p.data,
                       stream_id=f"{entry_id}.{i}")
            for i, p in enumerate(decoded.events)]


def _resume_point(after: bytes) -> tuple[bytes, bytes | None, int]:
    """For a position: the id to ``XREAD`` after, and the entry (with the index of the last
    event seen in it) to resume inside, if the position is inside an entry."""
    entry, dot, index = after.partition(b".")
    if not dot:
        return after, None, -1
    ms_text, _, seq_text = entry.partition(b"-")
    ms, seq = int(ms_text), int(seq_text)
    if seq > 0:
        previous = b"%d-%d" % (ms, seq - 1)
    else:
        previous = b"%d-%d" % (ms - 1, _MAX_SEQ) if ms > 0 else b"0-0"
    return previous, entry, int(index)


async def read_events(transport: StreamTransport, stream: str, *, after: bytes | None,
                      follow: bool, block_ms: int = 1_000, count: int = 500
                      ) -> AsyncIterator[AgentEvent]:
    """Events of ``stream`` after the position ``after`` (None: only new ones), each with its
    ``stream_id``; without ``follow`` it ends at the current end of the stream."""
    inside: bytes | None = None
    seen = -1
    if after is not None:
        after, inside, seen = _resume_point(after)
    async for entry in tail(transport, stream, after=after, follow=follow, block_ms=block_ms,
                            count=count):
        try:
            decoded = codec.decode_event(entry.fields)
        except CodecError as exc:
            log.warning("skipping event entry %s: %s", entry.id.decode(), exc)
            continue
        events = unpack(entry.id.decode(), decoded)
        if entry.id == inside:
            events = events[seen + 1:]
        for event in events:
            yield event


def event_envelope(fields: dict[bytes, bytes] | None) -> Envelope:
    """Decode an event entry for a group consumer: an envelope whose payload is the entry's
    event or batch (:func:`events_of` gives the events of a delivered one).

    :raises CodecError: if the entry is not a well-formed event (it is dead-lettered)
    """
    decoded = codec.decode_event(fields)
    assert fields is not None
    payload = msgspec.Raw(fields[codec.FIELD])
    if isinstance(decoded, EventBatch):
        first: PackedEvent | None = decoded.events[0] if decoded.events else None
        return Envelope(id=decoded.id, type="events", target="events",
                        sender_node=first.node_id if first else None,
                        created_ms=first.created_ms if first else now_ms(), payload=payload)
    return Envelope(id=decoded.id, type=decoded.type, target="events", sender=decoded.agent_id,
                    sender_node=decoded.node_id, session_id=decoded.session_id,
                    created_ms=decoded.created_ms, traceparent=decoded.traceparent,
                    payload=payload)


#: The payload type of a durable event group's messages.
EventEntry = AgentEvent | EventBatch


def events_of(message: Message) -> list[AgentEvent]:
    """The events a message of a durable event group carries (one entry: one or many)."""
    return unpack(message.stream_id, cast(EventEntry, message.payload))
