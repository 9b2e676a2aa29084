"""Redis Streams in pure Python: a stream, its consumer groups and their pending lists.

Every method is synchronous and runs between two awaits of
:class:`~coordinator.transport.memory.MemoryTransport`, so each call is atomic, as one Redis
command is. The semantics are those of Redis 7: XREADGROUP, XCLAIM, XAUTOCLAIM and XPENDING
behave as the server does (checked side by side against redis-server 7.0), including what
happens to pending entries whose stream entry was deleted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from ..errors import TransportError
from .protocol import ConsumerInfo, Entry, GroupInfo, PendingEntry

#: A stream id as a comparable ``(milliseconds, sequence)`` pair.
StreamId = tuple[int, int]

MAX_PART = 2**64 - 1
MIN_ID: StreamId = (0, 0)
MAX_ID: StreamId = (MAX_PART, MAX_PART)

#: XAUTOCLAIM examines at most COUNT times this many pending entries per call (Redis's default).
AUTOCLAIM_ATTEMPTS = 10

_BAD_ID = "ERR Invalid stream ID specified as stream command argument"


def parse_id(value: bytes | str, seq_default: int = 0) -> StreamId:
    """Parse ``ms-seq`` (or ``ms``, taking ``seq_default``) like Redis does.

    :raises TransportError: for anything that is not a stream id
    """
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    ms, sep, seq = text.partition("-")
    try:
        parts = (int(ms), int(seq) if sep else seq_default)
    except ValueError:
        raise TransportError(_BAD_ID) from None
    if not all(0 <= p <= MAX_PART for p in parts) or not ms.isdigit():
        raise TransportError(_BAD_ID)
    return parts


def format_id(sid: StreamId) -> bytes:
    """A stream id as Redis prints it."""
    return b"%d-%d" % sid


def range_bound(value: bytes | str, *, start: bool) -> StreamId | None:
    """A range bound: ``-``, ``+``, an id, or ``(id`` (exclusive). None: the range is empty."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if text == "-":
        return MIN_ID
    if text == "+":
        return MAX_ID
    exclusive = text.startswith("(")
    sid = parse_id(text[1:] if exclusive else text, 0 if start else MAX_PART)
    if not exclusive:
        return sid
    return _next_id(sid) if start else _previous_id(sid)


def _next_id(sid: StreamId) -> StreamId | None:
    if sid[1] < MAX_PART:
        return sid[0], sid[1] + 1
    return (sid[0] + 1, 0) if sid[0] < MAX_PART else None


def _previous_id(sid: StreamId) -> StreamId | None:
    if sid[1] > 0:
        return sid[0], sid[1] - 1
    return (sid[0] - 1, MAX_PART) if sid[0] > 0 else None


class Nack:
    """One pending entry: who holds it, since when, and how often it was delivered."""

    __slots__ = ("consumer", "delivered_ms", "deliveries")

    def __init__(self, consumer: str, delivered_ms: int, deliveries: int) -> None:
        self.consumer = consumer
        self.delivered_ms = delivered_ms
        self.deliveries = deliveries


class Consumer:
    """One consumer of a group: its own pending ids and when it was last seen."""

    __slots__ = ("name", "seen_ms", "pending")

    def __init__(self, name: str, now_ms: int) -> None:
        self.name = name
        self.seen_ms = now_ms
        self.pending: set[StreamId] = set()


class Group:
    """A consumer group: read position, pending list (PEL) in id order, consumers."""

    def __init__(self, name: str, last_delivered: StreamId) -> None:
        self.name = name
        self.last_delivered = last_delivered
        self.pel: dict[StreamId, Nack] = {}
        self._order: list[StreamId] = []  # the PEL's ids, sorted
        self.consumers: dict[str, Consumer] = {}

    def consumer(self, name: str, now_ms: int) -> Consumer:
        """Look a consumer up, creating it if needed, and mark it seen now."""
        found = self.consumers.get(name)
        if found is None:
            found = self.consumers[name] = Consumer(name, now_ms)
        found.seen_ms = now_ms
        return found

    def assign(self, sid: StreamId, consumer: Consumer, now_ms: int, deliveries: int) -> None:
        """Make ``consumer`` the holder of ``sid`` (adding it to the PEL if new)."""
        nack = self.pel.get(sid)
        if nack is None:
            self.pel[sid] = Nack(consumer.name, now_ms, deliveries)
            if not self._order or self._order[-1] < sid:
                self._order.append(sid)
            else:
                bisect.insort(self._order, sid)
        else:
            self._move(sid, nack, consumer)
            nack.delivered_ms, nack.deliveries = now_ms, deliveries
        consumer.pending.add(sid)

    def _move(self, sid: StreamId, nack: Nack, to: Consumer) -> None:
        if nack.consumer != to.name:
            old = self.consumers.get(nack.consumer)
            if old is not None:
                old.pending.discard(sid)
            nack.consumer = to.name
            to.pending.add(sid)

    def remove(self, sid: StreamId) -> bool:
        """Drop ``sid`` from the PEL (an ack); False if it was not pending."""
        nack = self.pel.pop(sid, None)
        if nack is None:
            return False
        del self._order[bisect.bisect_left(self._order, sid)]
        holder = self.consumers.get(nack.consumer)
        if holder is not None:
            holder.pending.discard(sid)
        return True

    def delete_consumer(self, name: str) -> int:
        """XGROUP DELCONSUMER: the consumer and its pending entries go; returns how many."""
        consumer = self.consumers.pop(name, None)
        if consumer is None:
            return 0
        for sid in list(consumer.pending):
            self.remove(sid)
        return len(consumer.pending)

    def pending_ids(self, low: StreamId, high: StreamId, consumer: str | None = None
                    ) -> Iterator[StreamId]:
        """Pending ids in ``[low, high]``, in order, optionally of one consumer only."""
        if consumer is None:
            ids: Sequence[StreamId] = self._order
        else:
            holder = self.consumers.get(consumer)
            ids = sorted(holder.pending) if holder is not None else []
        for i in range(bisect.bisect_left(ids, low), len(ids)):
            if ids[i] > high:
                return
            yield ids[i]

    def idle_ms(self, sid: StreamId, now_ms: int) -> int:
        return max(0, now_ms - self.pel[sid].delivered_ms)


class ClaimResult(NamedTuple):
    """What XAUTOCLAIM answers: the next cursor, claimed entries, deleted pending ids."""

    cursor: StreamId
    entries: list[Entry]
    deleted: list[StreamId]


class Stream:
    """One stream: entries in id order, the last id ever added, and its groups."""

    def __init__(self) -> None:
        self.last_id: StreamId = MIN_ID
        self._ids: list[StreamId] = []
        self._entries: dict[StreamId, dict[bytes, bytes]] = {}
        self.groups: dict[str, Group] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, fields: Mapping[bytes, bytes], now_ms: int) -> StreamId:
        """XADD with ``*``: ``now-0``, or ``last-(seq+1)`` when the clock did not move on."""
        last = self.last_id
        sid = (now_ms, 0) if now_ms > last[0] else (last[0], last[1] + 1)
        self.last_id = sid
        self._ids.append(sid)
        self._entries[sid] = dict(fields)
        return sid

    def exists(self, sid: StreamId) -> bool:
        return sid in self._entries

    def entry(self, sid: StreamId) -> Entry:
        return Entry(format_id(sid), dict(self._entries[sid]))

    def range(self, low: StreamId | None, high: StreamId | None, count: int | None = None,
              reverse: bool = False) -> list[Entry]:
        """XRANGE / XREVRANGE over ``[low, high]``; ``count`` None means all."""
        if low is None or high is None or low > high or count == 0:
            return []
        ids = self._ids[bisect.bisect_left(self._ids, low):bisect.bisect_right(self._ids, high)]
        if reverse:
            ids.reverse()
        if count is not None and count > 0:
            ids = ids[:count]
        return [self.entry(sid) for sid in ids]

    def after(self, sid: StreamId, count: int) -> list[StreamId]:
        """Ids strictly after ``sid``, at most ``count`` (0: all)."""
        start = bisect.bisect_right(self._ids, sid)
        return self._ids[start:start + count] if count > 0 else self._ids[start:]

    def delete(self, ids: Sequence[StreamId]) -> int:
        """XDEL: pending lists keep the ids (as Redis does)."""
        removed = 0
        for sid in ids:
            if self._entries.pop(sid, None) is not None:
                del self._ids[bisect.bisect_left(self._ids, sid)]
                removed += 1
        return removed

    def trim_min_id(self, min_id: StreamId) -> int:
        """XTRIM MINID (exact): drop every entry below ``min_id``."""
        cut = bisect.bisect_left(self._ids, min_id)
        for sid in self._ids[:cut]:
            del self._entries[sid]
        del self._ids[:cut]
        return cut

    def lag(self, group: Group) -> int:
        """Entries the group has not been delivered yet (computed, always known)."""
        return len(self._ids) - bisect.bisect_right(self._ids, group.last_delivered)

    # -- consumer-group reads --------------------------------------------------------------
    def read_new(self, group: Group, consumer: str, count: int, now_ms: int) -> list[Entry]:
        """XREADGROUP ``>``: entries after the group's position, now pending (count 1)."""
        holder = group.consumer(consumer, now_ms)
        ids = self.after(group.last_delivered, count)
        for sid in ids:
            group.assign(sid, holder, now_ms, 1)
        if ids:
            group.last_delivered = ids[-1]
        return [self.entry(sid) for sid in ids]

    def read_history(self, group: Group, consumer: str, after: StreamId, count: int,
                     now_ms: int) -> list[Entry]:
        """XREADGROUP with an id: this consumer's pending entries strictly after ``after``.

        As in Redis, each one still in the stream counts as delivered again (its counter goes
        up, its idle time restarts); a deleted one comes back with ``None`` fields, untouched.
        """
        holder = group.consumer(consumer, now_ms)
        start = _next_id(after)
        if start is None:
            return []
        ids = list(group.pending_ids(start, MAX_ID, holder.name))
        if count > 0:
            ids = ids[:count]
        out = []
        for sid in ids:
            if self.exists(sid):
                nack = group.pel[sid]
                nack.delivered_ms = now_ms
                nack.deliveries += 1
                out.append(self.entry(sid))
            else:
                out.append(Entry(format_id(sid), None))
        return out

    def claim(self, group: Group, consumer: str, min_idle_ms: int, ids: Sequence[StreamId],
              now_ms: int, *, idle_ms: int | None = None, justid: bool = False) -> list[Entry]:
        """XCLAIM [IDLE ms] [JUSTID]: ids pending for at least ``min_idle_ms`` change owner.

        Their delivery restarts now (or ``idle_ms`` ago), the counter goes up unless
        ``justid``; pending ids whose entry was deleted leave the PEL (Redis 7).
        """
        delivered = now_ms if idle_ms is None else now_ms - idle_ms
        if delivered < 0 or delivered > now_ms:  # Redis replaces a bogus time by now
            delivered = now_ms
        holder: Consumer | None = None
        out = []
        for sid in ids:
            if not self.exists(sid):
                group.remove(sid)
                continue
            nack = group.pel.get(sid)
            if nack is None or (min_idle_ms and group.idle_ms(sid, now_ms) < min_idle_ms):
                continue
            if holder is None:
                holder = group.consumer(consumer, now_ms)
            group.assign(sid, holder, delivered, nack.deliveries + (0 if justid else 1))
            out.append(Entry(format_id(sid), None) if justid else self.entry(sid))
        return out

    def autoclaim(self, group: Group, consumer: str, min_idle_ms: int, cursor: StreamId,
                  count: int, now_ms: int) -> ClaimResult:
        """XAUTOCLAIM: scan the PEL from ``cursor``; at most ``count`` results (claimed or
        deleted) and ``count * 10`` entries examined; the cursor is the next pending id after
        the last one examined, or ``0-0`` when the scan reached the end."""
        scan = list(_take(group.pending_ids(cursor, MAX_ID), count * AUTOCLAIM_ATTEMPTS + 1))
        holder: Consumer | None = None
        entries: list[Entry] = []
        deleted: list[StreamId] = []
        examined = 0
        for sid in scan[:count * AUTOCLAIM_ATTEMPTS]:
            examined += 1
            if not self.exists(sid):
                group.remove(sid)
                deleted.append(sid)
            elif not min_idle_ms or group.idle_ms(sid, now_ms) >= min_idle_ms:
                if holder is None:
                    holder = group.consumer(consumer, now_ms)
                group.assign(sid, holder, now_ms, group.pel[sid].deliveries + 1)
                entries.append(self.entry(sid))
            else:
                continue
            if len(entries) + len(deleted) >= count:
                break
        next_cursor = scan[examined] if examined < len(scan) else MIN_ID
        return ClaimResult(next_cursor, entries, deleted)

    # -- inspection ------------------------------------------------------------------------
    def pending(self, group: Group, low: StreamId | None, high: StreamId | None, count: int,
                consumer: str | None, now_ms: int) -> list[PendingEntry]:
        """XPENDING range form, optionally for one consumer."""
        if low is None or high is None or count <= 0:
            return []
        rows = []
        for sid in _take(group.pending_ids(low, high, consumer), count):
            nack = group.pel[sid]
            rows.append(PendingEntry(format_id(sid), nack.consumer,
                                     group.idle_ms(sid, now_ms), nack.deliveries))
        return rows

    def consumers_info(self, group: Group, now_ms: int) -> list[ConsumerInfo]:
        """XINFO CONSUMERS, sorted by name as Redis lists them."""
        return [ConsumerInfo(c.name, len(c.pending), max(0, now_ms - c.seen_ms))
                for _, c in sorted(group.consumers.items())]

    def groups_info(self) -> list[GroupInfo]:
        """XINFO GROUPS, sorted by name as Redis lists them."""
        return [GroupInfo(g.name, len(g.consumers), len(g.pel), format_id(g.last_delivered),
                          self.lag(g)) for _, g in sorted(self.groups.items())]


def _take(ids: Iterator[StreamId], n: int) -> Iterator[StreamId]:
    for i, sid in enumerate(ids):
        if i >= n:
            return
        yield sid
