"""StreamTransport in pure Python, for single-process use and fast tests (``provider: memory``).

One :class:`MemoryTransport` instance is one "server": every coordinator, producer and consumer
of a process that should see the same streams must share that instance, as they would share one
Redis. There is no module-level state; two instances know nothing of each other. An instance
belongs to one event loop (its blocking reads wait on anyio events).

Semantics follow Redis 7 (see :mod:`.memory_streams`), the Lua scripts of :mod:`.scripts`
included, and errors are the ones :class:`~coordinator.transport.redis.RedisTransport` maps:
:class:`GroupMissing` exactly where Redis answers NOGROUP (or UNBLOCKED), ``WRONGTYPE`` and bad
ids as :class:`TransportError`. Time comes from an injectable clock, so tests can move it
forward to make entries idle or keys expire; blocking reads wait in real time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import anyio

from ..errors import GroupMissing, TransportError
from .memory_streams import Group, Stream, format_id, parse_id, range_bound
from .protocol import ClaimBatch, ConsumerInfo, Entry, GroupInfo, PendingEntry, PiggybackSource

#: What a key may hold: a string, a sorted set (member -> score), a set, or a stream.
Value = bytes | dict[str, float] | set[str] | Stream

_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class MemoryTransport:
    """A :class:`StreamTransport` keeping streams, groups and keys in this process.

    :param clock: wall-clock seconds (default :func:`time.time`); stream ids, idle times and
        key expiry are computed from it
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.version = (7, 2, 0)
        self._clock = clock
        self._data: dict[str, Value] = {}
        self._expires: dict[str, int] = {}  # key -> expiry time (ms)
        self._signals: dict[str, anyio.Event] = {}  # stream key -> set on its next change

    def now_ms(self) -> int:
        """The clock in milliseconds."""
        return round(self._clock() * 1000)

    def flushall(self) -> None:
        """Delete every key (FLUSHALL); blocked group readers fail with GroupMissing."""
        self._data.clear()
        self._expires.clear()
        for key in list(self._signals):
            self._wake(key)

    # -- key space ---------------------------------------------------------------------------
    def _get(self, key: str) -> Value | None:
        expires = self._expires.get(key)
        if expires is not None and self.now_ms() > expires:  # lazy expiry, as Redis does
            self._delete(key)
        return self._data.get(key)

    def _typed(self, key: str, kind: type[object]) -> Value | None:
        value = self._get(key)
        if value is not None and not isinstance(value, kind):
            raise TransportError(_WRONGTYPE)
        return value

    def _delete(self, key: str) -> bool:
        self._expires.pop(key, None)
        value = self._data.pop(key, None)
        if isinstance(value, Stream):
            self._wake(key)
        return value is not None

    def _stream(self, key: str) -> Stream | None:
        value = self._typed(key, Stream)
        assert value is None or isinstance(value, Stream)
        return value

    def _stream_for_write(self, key: str) -> Stream:
        stream = self._stream(key)
        if stream is None:
            stream = self._data[key] = Stream()
        return stream

    def _zset(self, key: str, create: bool = False) -> dict[str, float] | None:
        value = self._typed(key, dict)
        if value is None and create:
            value = self._data[key] = {}
        assert value is None or isinstance(value, dict)
        return value

    def _group(self, key: str, group: str, command: str) -> tuple[Stream, Group]:
        stream = self._stream(key)
        found = stream.groups.get(group) if stream is not None else None
        if stream is None or found is None:
            raise GroupMissing(f"NOGROUP No such key '{key}' or consumer group '{group}'"
                               f" in {command}")
        return stream, found

    # -- blocking ----------------------------------------------------------------------------
    def _wake(self, key: str) -> None:
        event = self._signals.pop(key, None)
        if event is not None:
            event.set()

    async def _changed(self, key: str) -> None:
        """Wait until ``key`` gets an entry, is deleted or is overwritten."""
        event = self._signals.get(key)
        if event is None:
            event = self._signals[key] = anyio.Event()
        await event.wait()

    @staticmethod
    def _block_s(block_ms: int) -> float:
        return math.inf if block_ms == 0 else block_ms / 1000  # BLOCK 0 waits forever

    # -- streams -----------------------------------------------------------------------------
    async def add(self, stream: str, data: bytes) -> bytes:
        return self.add_fields(stream, {b"e": data})

    def add_fields(self, stream: str, fields: Mapping[bytes, bytes]) -> bytes:
        """XADD with any fields (well-formed entries carry only ``e``; tests add others)."""
        sid = self._stream_for_write(stream).add(fields, self.now_ms())
        self._wake(stream)
        return format_id(sid)

    async def add_many(self, stream: str, datas: Sequence[bytes]) -> list[bytes]:
        return [self.add_fields(stream, {b"e": data}) for data in datas]

    async def add_capped(self, stream: str, datas: Sequence[bytes], maxlen: int,
                         ttl_ms: int) -> list[bytes]:
        """XADD with MAXLEN (trimmed exactly, which ``~`` allows) and PEXPIRE."""
        if ttl_ms <= 0:
            raise TransportError("ERR invalid expire time in 'pexpire' command")
        if not datas:
            return []
        ids = [self.add_fields(stream, {b"e": data}) for data in datas]
        found = self._stream_for_write(stream)
        excess = len(found) - max(maxlen, 0)
        if excess > 0:
            found.trim_min_id(found.after((0, 0), excess + 1)[-1] if maxlen > 0
                              else (found.last_id[0], found.last_id[1] + 1))
        self._expires[stream] = self.now_ms() + ttl_ms
        return ids

    async def add_expiring(self, stream: str, data: bytes, ttl_ms: int) -> bytes:
        """The ADD_EXPIRING script: XADD, then PEXPIRE."""
        if ttl_ms <= 0:
            raise TransportError("ERR invalid expire time in 'pexpire' command")
        self._stream(stream)  # WRONGTYPE before anything is written, as the script's XADD
        entry_id = self.add_fields(stream, {b"e": data})
        self._expires[stream] = self.now_ms() + ttl_ms
        return entry_id

    async def ensure_group(self, stream: str, group: str) -> None:
        found = self._stream_for_write(stream)  # MKSTREAM
        if group not in found.groups:  # an existing group (BUSYGROUP) is kept as it is
            found.groups[group] = Group(group, (0, 0))

    async def read_group(self, stream: str, group: str, consumer: str, count: int,
                         block_ms: int | None, history_after: bytes | None = None) -> list[Entry]:
        found, grp = self._group(stream, group, "XREADGROUP with GROUP option")
        if history_after is not None:  # history reads never block
            return found.read_history(grp, consumer, parse_id(history_after), count,
                                      self.now_ms())
        entries = found.read_new(grp, consumer, count, self.now_ms())
        if entries or block_ms is None:
            return entries
        with anyio.move_on_after(self._block_s(block_ms)):
            while not entries:
                await self._changed(stream)
                again, grp_again = self._group(stream, group, "XREADGROUP with GROUP option")
                if again is not found or grp_again is not grp:
                    raise GroupMissing("UNBLOCKED the stream key no longer exists")
                entries = found.read_new(grp, consumer, count, self.now_ms())
        return entries

    async def ack(self, stream: str, group: str, ids: Sequence[bytes]) -> int:
        return self._ack(stream, group, [parse_id(i) for i in ids])

    def _ack(self, stream: str, group: str, sids: Sequence[tuple[int, int]]) -> int:
        found = self._stream(stream)
        grp = found.groups.get(group) if found is not None else None
        if grp is None:  # XACK answers 0 for a missing key or group
            return 0
        return sum(grp.remove(sid) for sid in sids)

    async def ack_checked(self, stream: str, dedup: str, group: str, consumer: str,
                          pairs: Sequence[tuple[bytes, str]], check_owner: bool,
                          window_ms: int, now_ms: int) -> list[bytes]:
        """The ACK script: ack owned entries, remember their message ids for the window."""
        refused: list[bytes] = []
        for entry_id, message_id in pairs:
            if check_owner and not self._owns(stream, group, consumer, entry_id, "XPENDING"):
                refused.append(entry_id)
                continue
            self._ack(stream, group, [parse_id(entry_id)])
            if window_ms > 0 and message_id:
                zset = self._zset(dedup, create=True)
                assert zset is not None
                zset[message_id] = now_ms + window_ms
        if window_ms > 0:
            zset = self._zset(dedup)
            if zset is not None:
                for member in [m for m, score in zset.items() if score <= now_ms]:
                    del zset[member]
                if not zset:
                    self._delete(dedup)
        return refused

    def _owns(self, stream: str, group: str, consumer: str, entry_id: bytes,
              command: str) -> bool:
        _, grp = self._group(stream, group, command)
        nack = grp.pel.get(parse_id(entry_id))
        return nack is not None and nack.consumer == consumer

    async def renew(self, stream: str, group: str, consumer: str,
                    ids: Sequence[bytes]) -> list[bytes]:
        """The RENEW_LEASES script: restart the idle time of owned entries, return the lost."""
        lost: list[bytes] = []
        for entry_id in ids:
            if self._owns(stream, group, consumer, entry_id, "XPENDING"):
                found, grp = self._group(stream, group, "XCLAIM")
                found.claim(grp, consumer, 0, [parse_id(entry_id)], self.now_ms(), justid=True)
            else:
                lost.append(entry_id)
        return lost

    async def dead_letter(self, stream: str, dead_letters: str, group: str, consumer: str,
                          entry_id: bytes, fields: Mapping[str, bytes | str]) -> bytes | None:
        """The DEAD_LETTER script: copy to the dead letters and ack, only if still owned."""
        if not self._owns(stream, group, consumer, entry_id, "XPENDING"):
            return None
        dead_id = self.add_fields(dead_letters, {k.encode(): _bytes(v) for k, v in fields.items()})
        self._ack(stream, group, [parse_id(entry_id)])
        return dead_id

    async def claim_idle(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                         cursor: bytes, count: int) -> ClaimBatch:
        if count <= 0:
            raise TransportError("ERR COUNT must be > 0")
        found, grp = self._group(stream, group, "XAUTOCLAIM")
        result = found.autoclaim(grp, consumer, min_idle_ms, parse_id(cursor), count,
                                 self.now_ms())
        return ClaimBatch(format_id(result.cursor), result.entries,
                          [format_id(sid) for sid in result.deleted])

    async def claim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                    ids: Sequence[bytes]) -> list[Entry]:
        if not ids:
            return []
        sids = [parse_id(i) for i in ids]
        found, grp = self._group(stream, group, "XCLAIM")
        return found.claim(grp, consumer, min_idle_ms, sids, self.now_ms())

    async def claim_owned(self, stream: str, group: str, consumer: str,
                          ids: Sequence[bytes]) -> list[Entry]:
        """The CLAIM_OWNED script: claim again only what this consumer still owns."""
        owned = [parse_id(i) for i in ids if self._owns(stream, group, consumer, i, "XPENDING")]
        if not owned:
            return []
        found, grp = self._group(stream, group, "XCLAIM")
        return found.claim(grp, consumer, 0, owned, self.now_ms())

    async def release(self, stream: str, group: str, consumer: str, ids: Sequence[bytes],
                      idle_ms: int) -> None:
        """The RELEASE_OWNED script: back-date only what this consumer still owns."""
        owned = [parse_id(i) for i in ids if self._owns(stream, group, consumer, i, "XPENDING")]
        if not owned:
            return
        found, grp = self._group(stream, group, "XCLAIM")
        found.claim(grp, consumer, 0, owned, self.now_ms(), idle_ms=idle_ms, justid=True)

    async def pending(self, stream: str, group: str, count: int, consumer: str | None = None,
                      start: bytes = b"-", end: bytes = b"+") -> list[PendingEntry]:
        low, high = range_bound(start, start=True), range_bound(end, start=False)
        found, grp = self._group(stream, group, "XPENDING")
        return found.pending(grp, low, high, count, consumer, self.now_ms())

    async def consumers(self, stream: str, group: str) -> list[ConsumerInfo]:
        if self._stream(stream) is None:
            raise TransportError("ERR no such key")  # XINFO's answer, not NOGROUP
        found, grp = self._group(stream, group, "XINFO CONSUMERS")
        return found.consumers_info(grp, self.now_ms())

    async def groups(self, stream: str) -> list[GroupInfo]:
        found = self._stream(stream)
        return found.groups_info() if found is not None else []

    async def delete_idle_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """The DELETE_IDLE_CONSUMER script: delete it only if it holds no pending entry."""
        _, grp = self._group(stream, group, "XPENDING")
        holder = grp.consumers.get(consumer)
        if holder is not None and holder.pending:
            return False
        grp.delete_consumer(consumer)
        return True

    async def trim_min_id(self, stream: str, min_id: bytes) -> int:
        bound = parse_id(min_id)
        found = self._stream(stream)
        return found.trim_min_id(bound) if found is not None else 0

    async def dedup_seen(self, dedup: str, message_ids: Sequence[str], now_ms: int) -> list[bool]:
        zset = self._zset(dedup) or {}
        return [zset.get(m, -math.inf) > now_ms for m in message_ids]

    async def length(self, stream: str) -> int:
        found = self._stream(stream)
        return len(found) if found is not None else 0

    async def range(self, stream: str, start: bytes | str, end: bytes | str,
                    count: int | None = None, reverse: bool = False) -> list[Entry]:
        # XREVRANGE takes (end, start), but both name the same interval.
        low, high = range_bound(start, start=True), range_bound(end, start=False)
        found = self._stream(stream)
        return found.range(low, high, count, reverse) if found is not None else []

    async def read(self, stream: str, after: bytes, count: int,
                   block_ms: int | None) -> list[Entry]:
        found = self._stream(stream)
        if after in (b"$", "$"):
            last = found.last_id if found is not None else (0, 0)
        else:
            last = parse_id(after)
        entries = self._read_after(stream, last, count)
        if entries or block_ms is None:
            return entries
        with anyio.move_on_after(self._block_s(block_ms)):
            while not entries:  # XREAD keeps waiting through a deleted key
                await self._changed(stream)
                entries = self._read_after(stream, last, count)
        return entries

    def _read_after(self, stream: str, after: tuple[int, int], count: int) -> list[Entry]:
        found = self._stream(stream)
        if found is None:
            return []
        return [found.entry(sid) for sid in found.after(after, count)]

    async def delete_entries(self, stream: str, ids: Sequence[bytes]) -> int:
        if not ids:
            return 0
        sids = [parse_id(i) for i in ids]
        found = self._stream(stream)
        return found.delete(sids) if found is not None else 0

    async def move_back(self, dead_letters: str, stream: str, entry_id: bytes,
                        data: bytes) -> bytes:
        sid = parse_id(entry_id)
        new_id = self.add_fields(stream, {b"e": data})
        letters = self._stream(dead_letters)
        if letters is not None:
            letters.delete([sid])
        return new_id

    # -- plain keys --------------------------------------------------------------------------
    async def delete_keys(self, *keys: str) -> int:
        if not keys:
            raise TransportError("ERR wrong number of arguments for 'del' command")
        return sum(self._get(k) is not None and self._delete(k) for k in keys)

    async def put_ttl(self, key: str, data: bytes, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise TransportError("ERR invalid expire time in 'set' command")
        if isinstance(self._data.get(key), Stream):
            self._wake(key)  # overwriting a stream unblocks its readers
        self._data[key] = data
        self._expires[key] = self.now_ms() + ttl_ms

    async def expire(self, key: str, ttl_ms: int) -> bool:
        """PEXPIRE; a time to live of zero or less deletes the key, as Redis does."""
        if self._get(key) is None:
            return False
        if ttl_ms <= 0:
            return self._delete(key)
        self._expires[key] = self.now_ms() + ttl_ms
        return True

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = [self._typed(k, bytes) for k in keys]
        return [v if isinstance(v, bytes) else None for v in values]

    async def index_add(self, key: str, member: str, score: int) -> None:
        zset = self._zset(key, create=True)
        assert zset is not None
        zset[member] = float(score)

    async def index_members(self, key: str) -> list[tuple[str, int]]:
        zset = self._zset(key) or {}
        return [(m, int(s)) for m, s in sorted(zset.items(), key=lambda ms: (ms[1], ms[0]))]

    async def index_remove(self, key: str, *members: str) -> None:
        zset = self._zset(key)
        if zset is None:
            return
        for member in members:
            zset.pop(member, None)
        if not zset:
            self._delete(key)

    async def set_add(self, key: str, *members: str) -> None:
        if not members:
            return
        value = self._typed(key, set)
        if value is None:
            value = self._data[key] = set()
        assert isinstance(value, set)
        value.update(members)

    async def set_members(self, key: str) -> list[str]:
        value = self._typed(key, set)
        return sorted(value) if isinstance(value, set) else []

    async def ping(self) -> None:
        """Always answers: the server is this object."""

    def piggyback(self, source: PiggybackSource) -> Callable[[], None]:
        """Never polls ``source``: there is no round trip to spare."""
        return _nothing

    async def close(self) -> None:
        """Nothing to release; the data lives as long as the instance (other users may share it)."""


def _nothing() -> None:
    pass
