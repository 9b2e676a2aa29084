"""Dead letters: what is recorded when an entry is given up on, and how operators inspect,
redrive and purge them. Recording itself is atomic with the ack (a Lua script in transport)."""

from __future__ import annotations

import builtins  # annotations inside DeadLetters, where the method `list` shadows the builtin
import traceback as tb
from collections.abc import Sequence

import msgspec

from . import codec
from .envelope import Envelope
from .errors import CodecError
from .keys import Keys, StreamKeys
from .transport import Entry, StreamTransport

#: The header naming the one consumer group a redriven message is for: a topic's stream is
#: read by every subscriber's group, and only the group that gave up on it should run it again.
REDRIVE_HEADER = "kiki-redriven-for"

#: Why an entry was dead-lettered.
REASON_FAILED = "max_deliveries"
REASON_POISON = "poison"
REASON_REJECTED = "rejected"

_raw_encoder = msgspec.msgpack.Encoder()


def short_traceback(exc: BaseException, limit: int = 8) -> str:
    """The last frames of an exception's traceback, bounded in size."""
    text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__, limit=-limit))
    return text[-4000:]


def record_fields(*, reason: str, source: Entry, stream: str, group: str, consumer: str,
                  deliveries: int, failed_ms: int, exc: BaseException | None = None,
                  message_id: str | None = None) -> dict[str, bytes | str]:
    """The fields of a dead-letter entry: the original bytes plus why, where and when."""
    fields: dict[str, bytes | str] = {
        "reason": reason,
        "stream": stream,
        "group": group,
        "source_id": source.id,
        "consumer": consumer,
        "deliveries": str(deliveries),
        "failed_ms": str(failed_ms),
        "message_id": message_id or "",
        "error_type": type(exc).__name__ if exc else "",
        "error": str(exc)[:2000] if exc else "",
        "traceback": short_traceback(exc) if exc and reason == REASON_FAILED else "",
    }
    original = source.fields or {}
    if set(original) == {codec.FIELD}:
        fields["e"] = original[codec.FIELD]
    else:
        # Not a well-formed entry: keep every original field, byte for byte.
        fields["raw"] = _raw_encoder.encode(original)
    return fields


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead-lettered entry as operators see it."""

    id: str
    reason: str
    stream: str
    group: str
    source_id: str
    consumer: str
    deliveries: int
    failed_ms: int
    message_id: str
    error_type: str
    error: str
    traceback: str
    envelope: Envelope | None
    raw_size: int


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields.get(name.encode(), b"").decode(errors="replace")


def parse_record(entry: Entry) -> DeadLetter:
    """Turn a dead-letter stream entry into a :class:`DeadLetter`."""
    fields = entry.fields or {}
    data = fields.get(b"e")
    envelope = None
    if data is not None:
        try:
            envelope = codec.decode_envelope({codec.FIELD: data})
        except CodecError:
            envelope = None
    return DeadLetter(
        id=entry.id.decode(), reason=_text(fields, "reason"), stream=_text(fields, "stream"),
        group=_text(fields, "group"), source_id=_text(fields, "source_id"),
        consumer=_text(fields, "consumer"), deliveries=int(_text(fields, "deliveries") or 0),
        failed_ms=int(_text(fields, "failed_ms") or 0), message_id=_text(fields, "message_id"),
        error_type=_text(fields, "error_type"), error=_text(fields, "error"),
        traceback=_text(fields, "traceback"), envelope=envelope,
        raw_size=len(data if data is not None else fields.get(b"raw", b"")),
    )


def _for_group(data: bytes, group: str) -> bytes | None:
    """The envelope ``data`` marked as redriven for ``group`` (None: not an intact one)."""
    try:
        envelope = codec.decode_envelope({codec.FIELD: data})
    except CodecError:
        return None
    if not group:
        return data
    return codec.encode(msgspec.structs.replace(
        envelope, headers={**envelope.headers, REDRIVE_HEADER: group}))


class DeadLetters:
    """Inspect, redrive and purge the dead letters of one stream.

    :param group: only those one consumer group gave up on (a topic's dead letters are
        shared by its subscribers' groups)
    """

    def __init__(self, transport: StreamTransport, keys: StreamKeys,
                 group: str | None = None) -> None:
        self._transport = transport
        self._keys = keys
        self._group = group.encode() if group is not None else None

    @classmethod
    def of(cls, transport: StreamTransport, keys: Keys, agent_id: str,
           topic: str | None = None) -> DeadLetters:
        """Those of an agent's inbox, or of its subscription to ``topic``."""
        if topic is None:
            return cls(transport, keys.inbox(agent_id))
        return cls(transport, keys.subscription(topic, agent_id), agent_id)

    async def count(self) -> int:
        """How many dead letters there are."""
        if self._group is None:
            return await self._transport.length(self._keys.dead_letters)
        return len(await self._select(None))

    async def list(self, count: int = 100, after: str = "-") -> list[DeadLetter]:
        """Dead letters oldest first, starting after ``after`` (exclusive; ``-`` = start)."""
        found: list[DeadLetter] = []
        start: bytes | str = after if after == "-" else f"({after}"
        while len(found) < count:
            rows = await self._transport.range(self._keys.dead_letters, start, "+",
                                               count=count)
            found += [parse_record(r) for r in rows if self._mine(r)]
            if len(rows) < count:
                break
            start = b"(" + rows[-1].id
        return found[:count]

    async def show(self, dead_id: str) -> DeadLetter | None:
        """One dead letter by its id, or None."""
        rows = await self._transport.range(self._keys.dead_letters, dead_id, dead_id, count=1)
        return parse_record(rows[0]) if rows and self._mine(rows[0]) else None

    async def redrive(self, dead_ids: Sequence[str] | None = None
                      ) -> tuple[int, builtins.list[str]]:
        """Put dead letters back on their stream (all when ``dead_ids`` is None), each for the
        group that gave up on it only (other subscriber groups of a topic skip it).

        Entries without an intact envelope (poison) cannot be redriven and are skipped.
        :returns: how many were redriven, and the ids skipped
        """
        rows = await self._select(dead_ids)
        moved, skipped = 0, []
        for row in rows:
            fields = row.fields or {}
            data = fields.get(b"e")
            marked = _for_group(data, fields.get(b"group", b"").decode()) if data else None
            if marked is None:
                skipped.append(row.id.decode())
                continue
            await self._transport.move_back(self._keys.dead_letters, self._keys.stream,
                                            row.id, marked)
            moved += 1
        return moved, skipped

    async def purge(self, dead_ids: Sequence[str] | None = None) -> int:
        """Delete dead letters for good (all when ``dead_ids`` is None)."""
        if dead_ids is None and self._group is None:
            total = await self.count()
            await self._transport.delete_keys(self._keys.dead_letters)
            return total
        ids = [r.id for r in await self._select(dead_ids)]
        return await self._transport.delete_entries(self._keys.dead_letters, ids) if ids else 0

    def _mine(self, entry: Entry) -> bool:
        return self._group is None or (entry.fields or {}).get(b"group") == self._group

    async def _select(self, dead_ids: Sequence[str] | None) -> builtins.list[Entry]:
        if dead_ids is None:
            rows: list[Entry] = []
            after: bytes | str = "-"
            while True:
                batch = await self._transport.range(self._keys.dead_letters, after, "+",
                                                    count=500)
                rows += [r for r in batch if self._mine(r)]
                if len(batch) < 500:
                    return rows
                after = b"(" + batch[-1].id
        found: list[Entry] = []
        for dead_id in dead_ids:
            found += await self._transport.range(self._keys.dead_letters, dead_id, dead_id, 1)
        return [r for r in found if self._mine(r)]
