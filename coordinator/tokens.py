"""Model tokens streamed across hosts: one capped, expiring stream per session.

Tokens are ephemeral by design, unlike messages and lifecycle events: each session's tokens go
to ``Keys.tokens(session_id)``, appended with ``MAXLEN ~ maxlen`` (10,000 by default) and a time
to live renewed on every write (one hour by default), so a long answer keeps only its tail and
an abandoned session's stream disappears by itself. They never enter the durable events stream.

Publishing never holds up the model: tokens go through a bounded buffer to a background task
that appends them in batches (one round trip per session per batch); when the buffer is full a
token is dropped and counted. A client on any host follows a session with :func:`read_tokens`
(``MultiAgentCoordinator.tokens``), or its events and tokens together with
:func:`follow_session`.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal, NamedTuple

import anyio
import anyio.abc
import msgspec

from .envelope import AgentEvent
from .errors import TransportError
from .events import AgentEventType, read_events
from .publishing import BufferedPublisher
from .registry import now_ms
from .tailing import last_id, tail
from .transport import StreamTransport

__all__ = ["Token", "TokenPublisher", "SessionItem", "TOKENS_MAXLEN", "TOKENS_TTL_MS",
           "follow_session", "read_tokens", "stream_id_key"]

log = logging.getLogger(__name__)

_STARTED = AgentEventType.STARTED.value

#: Entries a session's token stream keeps (approximately: Redis trims whole nodes).
TOKENS_MAXLEN = 10_000
#: A session's token stream expires this long after its last token.
TOKENS_TTL_MS = 3_600_000


class Token(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One streamed piece of model output. ``stream_id`` is filled in when read back."""

    text: str
    session_id: str
    agent_id: str | None = None
    node_id: str | None = None
    message_id: str | None = None
    run_id: str | None = None
    created_ms: int = 0
    stream_id: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Token)


def decode_token(fields: dict[bytes, bytes] | None) -> Token:
    """Decode a token entry.

    :raises msgspec.DecodeError: (or ValidationError) for an entry that is not a token
    """
    if not fields or b"e" not in fields:
        raise msgspec.DecodeError("entry has no 'e' field")
    return _decoder.decode(fields[b"e"])


class TokenPublisher(BufferedPublisher[tuple[str, bytes]]):
    """Appends tokens to their session's capped stream from a bounded buffer, in batches.

    :param key: builds a session's stream key (``Keys.tokens``)
    :param capacity: tokens buffered at most; beyond that they are dropped (and counted)
    :param maxlen: entries each session stream keeps (``MAXLEN ~``)
    :param ttl_ms: a session stream expires this long after its last write
    :param enabled: False publishes nothing
    :param batch_size: tokens written per round of writes at most
    :param timeout_ms: give up on one batch after this long (tokens are not retried)
    """

    def __init__(self, key: Callable[[str], str], *, capacity: int = 10_000,
                 maxlen: int = TOKENS_MAXLEN, ttl_ms: int = TOKENS_TTL_MS,
                 enabled: bool = True, batch_size: int = 1_000,
                 timeout_ms: int = 5_000) -> None:
        super().__init__(enabled=enabled, capacity=capacity, batch_size=batch_size,
                         timeout_ms=timeout_ms)
        #: Builds a session's stream key (``Keys.tokens``).
        self.key = key
        self.maxlen = maxlen
        self.ttl_ms = ttl_ms

    def publish_nowait(self, token: Token) -> bool:
        """Queue ``token`` without waiting; False when it was dropped (full, closed, disabled,
        bad session id). Never raises."""
        if not self.enabled:
            return False
        try:
            key = self.key(token.session_id)
            data = _encoder.encode(token)
        except Exception as exc:  # a session id no key can hold, or an unencodable value
            log.warning("token dropped: %s", exc)
            self.dropped += 1
            return False
        return self._offer((key, data))

    async def _write(self, transport: StreamTransport, batch: list[tuple[str, bytes]]) -> None:
        by_key: dict[str, list[bytes]] = {}
        for key, data in batch:
            by_key.setdefault(key, []).append(data)
        for key, datas in by_key.items():
            try:
                with anyio.fail_after(self._timeout_s):
                    await transport.add_capped(key, datas, self.maxlen, self.ttl_ms)
            except (TransportError, TimeoutError) as exc:
                # Ephemeral: a token late is a token useless; count it and move on.
                log.warning("writing %d tokens failed: %s", len(datas),
                            exc or type(exc).__name__)
                self.failed += len(datas)
                continue
            self.published += len(datas)


def make_token(text: str, session_id: str, *, agent_id: str | None = None,
               node_id: str | None = None, message_id: str | None = None,
               run_id: str | None = None) -> Token:
    """A token stamped with the current time."""
    return Token(text=text, session_id=session_id, agent_id=agent_id, node_id=node_id,
                 message_id=message_id, run_id=run_id, created_ms=now_ms())


async def read_tokens(transport: StreamTransport, stream: str, *, after: bytes | None,
                      follow: bool, block_ms: int = 1_000, count: int = 1_000
                      ) -> AsyncIterator[Token]:
    """Tokens of a session stream after the id ``after`` (None: only new ones), each with its
    ``stream_id``; without ``follow`` it ends at the current end of the stream. Tokens trimmed
    away before they were read are skipped silently (the stream is capped)."""
    async for entry in tail(transport, stream, after=after, follow=follow, block_ms=block_ms,
                            count=count):
        try:
            token = decode_token(entry.fields)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("skipping token entry %s: %s", entry.id.decode(), exc)
            continue
        yield msgspec.structs.replace(token, stream_id=entry.id.decode())


def stream_id_key(stream_id: str) -> tuple[int, int, int]:
    """A position (``ms-seq`` or ``ms-seq.i``) as a sortable triple (positions of different
    streams on one server interleave by time this way)."""
    entry, _, index = stream_id.partition(".")
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0), int(index or 0)


class SessionItem(NamedTuple):
    """One item of :func:`follow_session`: a lifecycle event or a token."""

    stream: Literal["events", "tokens"]
    item: AgentEvent | Token


def _time_order(item: SessionItem) -> tuple[int, int]:
    """Items of the two streams interleave by when they were made, not by when Redis appended
    them: a handler's started event, tokens and completed event come in the order it made
    them, whichever publisher reached Redis first. Within one millisecond a started event
    comes before tokens and other events after them. Merged, each stream keeps its order."""
    made = item.item.created_ms or stream_id_key(item.item.stream_id)[0]
    if isinstance(item.item, Token):
        return made, 1
    return made, 0 if item.item.type == _STARTED else 2


@asynccontextmanager
async def follow_session(transport: StreamTransport, events_key: str, tokens_key: str | None,
                         session_id: str, *, events_after: bytes | None,
                         tokens_after: bytes | None, follow: bool, block_ms: int = 1_000,
                         buffer: int = 1_000) -> AsyncIterator[AsyncIterator[SessionItem]]:
    """A session's lifecycle events and (when ``tokens_key`` is given) its tokens, together.

    What is already stored comes first, both streams merged by stream id (time); then, with
    ``follow``, new items as each stream delivers them. Each stream has its own cursor
    (``events_after``, ``tokens_after``; None: from now on), so a consumer resumes each after
    the last id it saw. Use as ``async with follow_session(...) as items: async for ...``.
    """
    events_from = events_after if events_after is not None else \
        await last_id(transport, events_key)
    tokens_from = None
    if tokens_key is not None:
        tokens_from = tokens_after if tokens_after is not None else \
            await last_id(transport, tokens_key)
    send, receive = anyio.create_memory_object_stream[SessionItem](buffer)

    async def session_events(after: bytes, live: bool) -> AsyncIterator[SessionItem]:
        nonlocal events_from
        async for event in read_events(transport, events_key, after=after, follow=live,
                                       block_ms=block_ms):
            events_from = event.stream_id.encode()  # read past, matching or not
            if event.session_id == session_id:
                yield SessionItem("events", event)

    async def session_tokens(after: bytes, live: bool) -> AsyncIterator[SessionItem]:
        assert tokens_key is not None
        async for token in read_tokens(transport, tokens_key, after=after, follow=live,
                                       block_ms=block_ms):
            yield SessionItem("tokens", token)

    async def pump(items: AsyncIterator[SessionItem],
                   out: anyio.abc.ObjectSendStream[SessionItem]) -> None:
        async with out:
            async for item in items:
                await out.send(item)

    async def produce() -> None:
        nonlocal tokens_from
        async with send:
            # What is stored now, merged by time.
            stored: list[SessionItem] = [i async for i in session_events(events_from, False)]
            if tokens_from is not None:
                tokens = [i async for i in session_tokens(tokens_from, False)]
                if tokens:
                    tokens_from = tokens[-1].item.stream_id.encode()
                stored = list(heapq.merge(stored, tokens, key=_time_order))
            for item in stored:
                await send.send(item)
            if not follow:
                return
            async with anyio.create_task_group() as live:
                live.start_soon(pump, session_events(events_from, True), send.clone())
                if tokens_from is not None:
                    live.start_soon(pump, session_tokens(tokens_from, True), send.clone())

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        try:
            async with receive:
                yield receive
        finally:
            tg.cancel_scope.cancel()
