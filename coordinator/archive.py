"""Audit archive of lifecycle events, and replay of a session's messages.

``persistence.storage: filesystem`` or ``postgres`` keeps every lifecycle event beyond Redis
retention. The :class:`Archiver` is a durable consumer group (``archiver``) on the events
stream: an event is acknowledged only once it is stored, so a crash, a stopped node or a
database outage loses nothing; the group resumes where it stopped and catches up. Redis
retention never trims what the group has not acknowledged.

Stores are idempotent by event id, so an event delivered twice (a retry after a write whose
acknowledgement was lost, a takeover after a crash) is kept once:

- :class:`FileArchive`: JSON Lines, one file per UTC day (``events-YYYY-MM-DD.jsonl``), one
  event a line, readable with ``grep``/``jq``. The ids of a day file are indexed by scanning
  it when first touched, and the index is brought up to date from the file (under an
  exclusive ``flock``) before every append, so processes sharing a directory do not write an
  event twice. A torn last line left by a crash is cut off before the next append.
- :class:`~coordinator.archive_postgres.PostgresArchive`: the ``kiki_events`` table (created
  if missing), batched ``INSERT ... ON CONFLICT (id) DO NOTHING``.

Writes are batched by group commit: every handler of the group adds its event to the open
batch and waits; one of them writes the whole batch. While the store is unreachable a batch is
retried in place (its handlers keep their slots, so the group stops reading: backpressure)
for ``hold_s``, then handed back with :class:`~coordinator.signals.Retry`, which never counts
toward dead-lettering. Only an event the store refuses as such (not an outage) fails like any
handler error.

Replay needs the messages, which events alone do not carry: a process whose configuration
archives (filesystem or postgres) also publishes one ``multiagent:sync`` event per message it
sends or broadcasts, holding target, type, sender, user, headers and the payload (decoded, so
the archive stays readable; bytes inside payloads are kept as base64 text by JSON storage).
:func:`replay_session` re-sends a session's recorded messages with the header
``kiki-replay: <original message id>``. Like every lifecycle event, such a record is
dropped rather than stalling the sender when the publish buffer is full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from . import codec
from .agent import Message, Registration
from .archive_store import (ArchiveStore, ArchiveUnavailable, FileArchive, encode_line,
                            open_store)
from .config import CoordinatorConfig, PersistenceConfig
from .envelope import AgentEvent, Envelope
from .errors import CodecError
from .events import EVENTS_TOPIC, AgentEventType, EventEntry, after_id, events_of, read_events
from .keys import Keys
from .signals import Retry
from .transport import StreamTransport

if TYPE_CHECKING:
    from .coordinator import MultiAgentCoordinator

__all__ = ["REPLAY_HEADER", "ArchiveStore", "ArchiveUnavailable", "Archiver", "FileArchive",
           "Replayed", "archived_events", "archives", "archiving", "open_store",
           "replay_session", "session_messages", "sync_event"]

log = logging.getLogger(__name__)

#: The header a replayed message carries: the id of the message it repeats.
REPLAY_HEADER = "kiki-replay"
#: The default consumer group of archivers on the events stream.
ARCHIVER_GROUP = "archiver"
_SYNC = str(AgentEventType.MULTI_AGENT_SYNC)
_MAX_SEQ = 18446744073709551615


def archives(persistence: PersistenceConfig) -> bool:
    """Whether this configuration keeps an archive beyond Redis (filesystem or postgres)."""
    return persistence.enabled and persistence.storage in ("filesystem", "postgres")


# -- the record of a sent message -------------------------------------------------------------


def sync_event(envelope: Envelope, via: str, node_id: str | None) -> AgentEvent | None:
    """The ``multiagent:sync`` event recording a message as sent (None if its payload cannot
    be decoded, which :meth:`MultiAgentCoordinator.send` never produces)."""
    try:
        payload = codec.decode_payload(envelope.payload)
    except CodecError:
        return None
    data: dict[str, Any] = {"via": via, "target": envelope.target, "type": envelope.type,
                            "sender": envelope.sender, "payload": payload}
    if envelope.user_id is not None:
        data["user_id"] = envelope.user_id
    if envelope.headers:
        data["headers"] = dict(envelope.headers)
    if envelope.correlation_id is not None:
        data["request"] = True
    return AgentEvent(id=f"sync-{envelope.id}", type=_SYNC, agent_id=envelope.sender,
                      node_id=node_id, session_id=envelope.session_id, message_id=envelope.id,
                      created_ms=envelope.created_ms, traceparent=envelope.traceparent,
                      data=data)


# -- the archiver ---------------------------------------------------------------------------


class _Batch:
    __slots__ = ("events", "done", "written", "errors", "unavailable")

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []
        self.done = anyio.Event()
        self.written = False
        self.errors: dict[int, Exception] = {}
        self.unavailable: Exception | None = None


class Archiver:
    """Writes lifecycle events to a store as the durable group ``group`` (group commit).

    :param batch_size: events written per batch at most; also the group's handler slots
    :param linger_s: how long the first event of a batch waits for company
    :param hold_s: an outage is waited out this long with the events held, then they are
        handed back with :class:`Retry`
    :param retry_delay_s: the delay of that Retry (the group reads them again after it)
    """

    def __init__(self, store: ArchiveStore, *, group: str = ARCHIVER_GROUP,
                 batch_size: int = 256, linger_s: float = 0.005, hold_s: float = 30.0,
                 retry_delay_s: float = 5.0) -> None:
        self.store = store
        self.group = group
        self.archived = 0
        self.duplicates = 0
        self.failed_writes = 0
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._hold_s = hold_s
        self._retry_delay_s = retry_delay_s
        self._open: _Batch | None = None
        self._lock = anyio.Lock()
        self._down_since: float | None = None

    def attach(self, coordinator: MultiAgentCoordinator) -> None:
        """Consume the events stream of ``coordinator`` as the group (starts with it)."""

        async def deliver(message: Message) -> None:
            await self.archive(*events_of(message))

        coordinator.add(Registration(self.group, deliver, topic=EVENTS_TOPIC,
                                     payload_type=EventEntry, concurrency=self._batch_size))

    async def archive(self, *events: AgentEvent) -> None:
        """Store ``events`` (those of one stream entry) with whatever else arrives meanwhile;
        returns once they are stored.

        :raises Retry: the store stayed unavailable for ``hold_s``
        :raises Exception: the store refused one of these events itself (the others are
            stored all the same)
        """
        refused: Exception | None = None
        accepted = []
        for event in events:
            try:
                encode_line(event)  # an event JSON cannot hold fails alone, not its batch
            except CodecError as exc:
                refused = refused or exc
                continue
            accepted.append(event)
        if accepted:
            await self._join_batch(accepted)
        if refused is not None:
            raise refused

    async def _join_batch(self, events: list[AgentEvent]) -> None:
        batch = self._open
        leader = batch is None or len(batch.events) >= self._batch_size
        if leader:
            batch = self._open = _Batch()
        assert batch is not None
        first = len(batch.events)
        batch.events.extend(events)
        if leader:
            try:
                await anyio.sleep(self._linger_s)
                async with self._lock:
                    if self._open is batch:
                        self._open = None
                    await self._flush(batch)
            finally:
                if self._open is batch:
                    self._open = None
                batch.done.set()  # followers wake even when we were cancelled
        else:
            await batch.done.wait()
        if batch.unavailable is not None:
            raise Retry(self._retry_delay_s, f"archive unavailable: {batch.unavailable}")
        for index in range(first, first + len(events)):
            if index in batch.errors:
                raise batch.errors[index]
        if not batch.written:
            raise Retry(self._retry_delay_s, "archive batch was not written")

    async def _flush(self, batch: _Batch) -> None:
        deadline = time.monotonic() + self._hold_s
        attempt = 0
        while True:
            try:
                new = await self.store.write(batch.events)
            except ArchiveUnavailable as exc:
                attempt += 1
                self.failed_writes += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("archive unavailable, holding %d events: %s",
                                len(batch.events), exc)
                delay = min(5.0, 0.1 * 2 ** min(attempt, 10))
                if time.monotonic() + delay > deadline:
                    batch.unavailable = exc
                    return
                await anyio.sleep(delay)
                continue
            except Exception:  # noqa: BLE001 - one bad event: find it, write the rest
                await self._one_by_one(batch)
                return
            self._written(batch, new)
            return

    async def _one_by_one(self, batch: _Batch) -> None:
        new = 0
        for index, event in enumerate(batch.events):
            try:
                new += await self.store.write([event])
            except ArchiveUnavailable as exc:
                batch.unavailable = exc
                return
            except Exception as exc:  # noqa: BLE001 - fails this event's handler
                log.warning("archive refused event %s: %s", event.id, exc)
                batch.errors[index] = exc
        self._written(batch, new)

    def _written(self, batch: _Batch, new: int) -> None:
        if self._down_since is not None:
            log.info("archive available again after %.1fs",
                     time.monotonic() - self._down_since)
            self._down_since = None
        batch.written = True
        self.archived += new
        self.duplicates += len(batch.events) - len(batch.errors) - new

    async def aclose(self) -> None:
        """Close the store."""
        with anyio.CancelScope(shield=True):
            await self.store.close()


@asynccontextmanager
async def archiving(coordinator: MultiAgentCoordinator, *, enabled: bool = True,
                    **options: Any) -> AsyncIterator[Archiver | None]:
    """Run an :class:`Archiver` with ``coordinator`` when its configuration archives
    (enter before the coordinator, so the group starts with it); yields None otherwise."""
    persistence = coordinator.config.persistence
    if not enabled or not archives(persistence) or not coordinator.config.enabled:
        yield None
        return
    archiver = Archiver(open_store(persistence), **options)
    archiver.attach(coordinator)
    log.info("archiving lifecycle events to %s as group %r", _where(persistence),
             archiver.group)
    try:
        yield archiver
    finally:
        await archiver.aclose()


def _where(persistence: PersistenceConfig) -> str:
    if persistence.storage == "filesystem":
        return f"directory {persistence.directory}"
    from .config import mask_url

    return f"postgres {mask_url(persistence.postgres_url or '')}"


# -- reading ----------------------------------------------------------------------------------


def since_ms(since: str | int | None) -> int | None:
    """Epoch ms of a ``since`` (stream id, ``0``, epoch ms, ISO time); None for None."""
    after = after_id(since)
    if after is None:
        return None
    ms, _, seq = after.decode().partition("-")
    # after_id gives the last id *before* a moment ("ms-MAX"); a stream id counts from its ms.
    return int(ms) + 1 if int(seq or 0) == _MAX_SEQ else int(ms)


async def archived_events(config: CoordinatorConfig, transport: StreamTransport,
                          since: str | int, seen: set[str], *,
                          types: Collection[str] | None = None, agent_id: str | None = None,
                          session_id: str | None = None) -> AsyncIterator[AgentEvent]:
    """The archived events from ``since`` up to where the events stream in Redis begins
    (everything when it is empty), for a reader that continues in Redis afterwards.

    Ids of events near that boundary go into ``seen`` so the Redis part can skip them (an
    event's creation time and its stream id differ by a publish batch). Yields nothing when
    the configuration keeps no archive or Redis still holds ``since``.
    """
    if not archives(config.persistence):
        return
    start = since_ms(since)
    if start is None:
        return
    first = await transport.range(Keys(config.redis.prefix).events(), b"-", b"+", count=1)
    boundary = int(first[0].id.split(b"-")[0]) if first else None
    if boundary is not None and start >= boundary:
        return  # Redis retains all of it
    store = open_store(config.persistence)
    try:
        async for event in store.read(since_ms=start, until_ms=boundary, types=types,
                                      agent_id=agent_id, session_id=session_id):
            if boundary is None or event.created_ms >= boundary - 60_000:
                seen.add(event.id)
            yield event
    finally:
        await store.close()


async def session_messages(config: CoordinatorConfig, transport: StreamTransport,
                           session_id: str) -> list[AgentEvent]:
    """The recorded ``multiagent:sync`` messages of a session, oldest first: from the
    archive when there is one, else from what the events stream in Redis retains."""
    found: dict[str, AgentEvent] = {}
    if archives(config.persistence):
        store = open_store(config.persistence)
        try:
            async for event in store.read(session_id=session_id, types=[_SYNC]):
                found.setdefault(event.id, event)
        finally:
            await store.close()
    async for event in read_events(transport, Keys(config.redis.prefix).events(),
                                   after=b"0-0", follow=False):
        if event.type == _SYNC and event.session_id == session_id:
            found.setdefault(event.id, event)
    return sorted(found.values(), key=lambda e: (e.created_ms, e.id))


# -- replay -----------------------------------------------------------------------------------


class Replayed(msgspec.Struct, frozen=True):
    """One re-sent message."""

    original_id: str
    message_id: str | None
    via: str
    target: str
    sender: str | None


async def replay_session(coordinator: MultiAgentCoordinator, records: Iterable[AgentEvent], *,
                         to: str | None = None, dry_run: bool = False) -> list[Replayed]:
    """Re-send recorded messages (``multiagent:sync`` events), in order, marked with
    ``kiki-replay: <original id>``; sender, session, user, type and headers are kept.

    Requests are re-sent as plain messages (nobody waits for the reply), and messages that
    were themselves replays are skipped.

    :param to: only the messages that were sent to this agent (broadcasts are skipped)
    :param dry_run: report what would be sent, send nothing
    """
    done: list[Replayed] = []
    for record in records:
        data = record.data
        if record.type != _SYNC or record.message_id is None or "target" not in data:
            continue
        headers = {str(k): str(v) for k, v in (data.get("headers") or {}).items()}
        if REPLAY_HEADER in headers:
            continue
        via = "broadcast" if data.get("via") == "broadcast" else "send"
        target = str(data["target"])
        if to is not None and (via == "broadcast" or target != to):
            continue
        headers[REPLAY_HEADER] = record.message_id
        sender = data.get("sender")
        options: dict[str, Any] = {"session_id": record.session_id, "headers": headers,
                                   "type": str(data.get("type") or _SYNC),
                                   "user_id": data.get("user_id")}
        if sender:
            options["_sender"] = str(sender)
        message_id = None
        if not dry_run:
            if via == "broadcast":
                message_id = await coordinator.broadcast(target, data.get("payload"), **options)
            else:
                message_id = await coordinator.send(target, data.get("payload"), **options)
        done.append(Replayed(record.message_id, message_id, via, target,
                             str(sender) if sender else None))
    return done

