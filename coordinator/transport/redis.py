"""StreamTransport over redis.asyncio (with redis_packed and redis_errors, the only modules
that import ``redis``).

Redis exceptions are mapped once, at this boundary, by :func:`redis_errors.mapped_errors`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypedDict, cast

import redis.asyncio as aioredis
import redis.exceptions as rex

from ..config import RedisConfig, mask_url
from ..errors import ConnectionLost, GroupMissing, TransportError
from . import scripts
from .batching import AppendBatcher
from .protocol import ClaimBatch, ConsumerInfo, Entry, GroupInfo, PendingEntry, PiggybackSource
from .packed_scripts import PackedAppender, PackedScript
from .redis_packed import Connections, ack, read_group
from .redis_packed import delete as packed_delete
from .redis_packed import read as packed_read
from .redis_errors import error_code, mapped_errors

# Replies as redis-py parses them (RESP2); redis-py leaves most of them untyped or typed as a
# union of every shape, so each is cast once, where it is read.
#: One stream entry: ``(id, fields)``.
_Row: TypeAlias = "tuple[bytes, dict[bytes, bytes] | None]"
#: One row of XCLAIM/XAUTOCLAIM: ``(None, None)`` for an entry deleted while pending.
_ClaimedRow: TypeAlias = "tuple[bytes | None, dict[bytes, bytes] | None]"
#: XAUTOCLAIM: ``(next cursor, rows, deleted ids)``; Redis 6.2 sends no third element.
_AutoclaimReply: TypeAlias = ("tuple[bytes, list[_ClaimedRow]]"
                              " | tuple[bytes, list[_ClaimedRow], list[bytes]]")


class _PendingRow(TypedDict):
    """One row of XPENDING with a range."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


#: Where XINFO GROUPS reports no lag, it is counted up to this many entries (a bound on the
#: work one status call may cost the server).
LAG_COUNT_CAP = 10_000


def _entries(raw: list[Any] | None) -> list[Entry]:
    return [Entry(i, f) for i, f in raw] if raw else []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _resolve_driver_info_once(pool: aioredis.ConnectionPool) -> None:
    """Give every connection of ``pool`` the same driver info (name and version it reports
    with CLIENT SETINFO). Else redis-py 8 reads its own version from the package metadata
    for each new connection: 0.5-2 ms, paid again on every reconnect."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 8 looks nothing up
        return
    pool.connection_kwargs.setdefault("driver_info", DriverInfo())


class RedisTransport:
    """A :class:`StreamTransport` backed by one redis.asyncio client (and its pool)."""

    def __init__(self, client: aioredis.Redis, version: tuple[int, int, int] = (7, 0, 0)) -> None:
        self.client = client
        self.version = version
        pool = client.connection_pool
        self._connections = Connections(pool, pool.max_connections)
        # Scripts are called packed: redis-py's command layer doubles a call's CPU.
        script = functools.partial(PackedScript, client, self._connections)
        self._renew = script(scripts.RENEW_LEASES)
        self._ack = script(scripts.ACK)
        self._dead = script(scripts.DEAD_LETTER)
        self._delete_consumer = script(scripts.DELETE_IDLE_CONSUMER)
        self._claim_owned = script(scripts.CLAIM_OWNED)
        self._release_owned = script(scripts.RELEASE_OWNED)
        self._count_after = script(scripts.COUNT_AFTER)
        self._add_expiring = script(scripts.ADD_EXPIRING)
        self._appender = PackedAppender(client, self._connections)
        self._appends = AppendBatcher(self._appender.append)

    @classmethod
    async def connect(cls, config: RedisConfig) -> RedisTransport:
        """Connect, check the server answers, and detect its version.

        :raises ConnectionLost: if Redis cannot be reached
        """
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url, password=config.password, max_connections=config.max_connections,
            socket_timeout=config.socket_timeout_s, socket_connect_timeout=5, timeout=30,
        )
        _resolve_driver_info_once(pool)
        client = aioredis.Redis(connection_pool=pool)
        try:
            version = await cls.detect_version(client)
        except ConnectionLost as exc:
            await client.aclose()
            raise ConnectionLost(f"cannot reach Redis at {mask_url(config.url)}: "
                                 f"{exc.__cause__ or exc}") from None
        return cls(client, version)

    @staticmethod
    async def detect_version(client: aioredis.Redis) -> tuple[int, int, int]:
        """The server's version from INFO, as a tuple."""
        with mapped_errors():
            info = await client.info("server")
        parts = (str(info.get("redis_version", "7.0.0")).split(".") + ["0", "0"])[:3]
        major, minor, patch = (int(p) if p.isdigit() else 0 for p in parts)
        return (major, minor, patch)

    # -- streams ------------------------------------------------------------------------
    async def add(self, stream: str, data: bytes) -> bytes:
        # Concurrent callers share round trips (see batching.AppendBatcher).
        return await self._appends.append(stream, data)

    async def add_many(self, stream: str, datas: Sequence[bytes]) -> list[bytes]:
        """Append many entries to one stream in one round trip."""
        # Concurrent callers share round trips, as with add.
        replies = await self._appends.append_many(stream, datas)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies  # type: ignore[return-value]

    async def add_capped(self, stream: str, datas: Sequence[bytes], maxlen: int,
                         ttl_ms: int) -> list[bytes]:
        """XADD each with ``MAXLEN ~ maxlen``, then PEXPIRE the key, in one round trip."""
        if not datas:
            return []
        with mapped_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for data in datas:
                    pipe.xadd(stream, {b"e": data}, maxlen=maxlen, approximate=True)
                pipe.pexpire(stream, ttl_ms)
                replies = await pipe.execute()
        return list(replies[:-1])

    async def add_expiring(self, stream: str, data: bytes, ttl_ms: int) -> bytes:
        """XADD and PEXPIRE in one script call (one key, so cluster-safe)."""
        return cast(bytes, await self._add_expiring([stream], [data, ttl_ms]))

    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            with mapped_errors():
                await self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except TransportError as exc:
            if isinstance(exc.__cause__, rex.ResponseError) and \
                    error_code(exc.__cause__) == "BUSYGROUP":
                return
            raise

    async def read_group(self, stream: str, group: str, consumer: str, count: int,
                         block_ms: int | None, history_after: bytes | None = None) -> list[Entry]:
        if history_after is None:  # new entries, blocking
            return await read_group(self._connections, stream, group, consumer, count,
                                    block_ms, b">")
        return await read_group(self._connections, stream, group, consumer, count,
                                None, history_after)

    async def ack(self, stream: str, group: str, ids: Sequence[bytes]) -> int:
        return await ack(self._connections, stream, group, ids)

    async def ack_checked(self, stream: str, dedup: str, group: str, consumer: str,
                          pairs: Sequence[tuple[bytes, str]], check_owner: bool,
                          window_ms: int, now_ms: int) -> list[bytes]:
        args: list[Any] = [group, consumer, "1" if check_owner else "0", now_ms, window_ms]
        for entry_id, message_id in pairs:
            args += (entry_id, message_id)
        return list(await self._ack([stream, dedup], args))

    async def renew(self, stream: str, group: str, consumer: str,
                    ids: Sequence[bytes]) -> list[bytes]:
        return list(await self._renew([stream], [group, consumer, *ids]))

    async def dead_letter(self, stream: str, dead_letters: str, group: str, consumer: str,
                          entry_id: bytes, fields: Mapping[str, bytes | str]) -> bytes | None:
        args: list[Any] = [group, consumer, entry_id]
        for name, value in fields.items():
            args += (name, value)
        return await self._dead([stream, dead_letters], args) or None

    async def claim_idle(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                         cursor: bytes, count: int) -> ClaimBatch:
        with mapped_errors():
            reply = cast(_AutoclaimReply, await self.client.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id=cursor, count=count))
        entries = [Entry(i, f) for i, f in reply[1] if i is not None]
        deleted = list(reply[2]) if len(reply) > 2 else []
        if len(entries) < len(reply[1]):
            # Redis 6.2 returns deleted entries as nil and keeps them pending: find their
            # ids among what we now own in the scanned range.
            deleted += await self._deleted_in_range(stream, group, consumer, cursor,
                                                    reply[0], {e.id for e in entries})
        return ClaimBatch(reply[0], entries, deleted)

    async def _deleted_in_range(self, stream: str, group: str, consumer: str, start: bytes,
                                end: bytes, seen: set[bytes]) -> list[bytes]:
        upper: bytes | str = "+" if end in (b"0-0", "0-0") else f"({_text(end)}"
        mine = await self.pending(stream, group, 1000, consumer, start, upper)  # type: ignore[arg-type]
        candidates = [p.id for p in mine if p.id not in seen and p.idle_ms < 1000]
        if not candidates:
            return []
        with mapped_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for entry_id in candidates:
                    pipe.xrange(stream, entry_id, entry_id, count=1)
                found = await pipe.execute()
        return [i for i, rows in zip(candidates, found) if not rows]

    async def claim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                    ids: Sequence[bytes]) -> list[Entry]:
        if not ids:
            return []
        with mapped_errors():
            reply = cast("list[_ClaimedRow]", await self.client.xclaim(
                stream, group, consumer, min_idle_ms, list(ids)))
        entries = [Entry(i, f) for i, f in reply if i is not None]
        if len(entries) < len(reply):
            # Redis 6.2 returns entries deleted while pending as nil and keeps them pending
            # (for us now); 7.x drops them from the pending list. Do the same here.
            claimed = {e.id for e in entries}
            await self._ack_deleted(stream, group, consumer,
                                    [i for i in ids if i not in claimed])
        return entries

    async def _ack_deleted(self, stream: str, group: str, consumer: str,
                           candidates: Sequence[bytes]) -> None:
        """Ack those of ``candidates`` that ``consumer`` owns and whose entry is gone."""
        with mapped_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for entry_id in candidates:
                    pipe.xrange(stream, entry_id, entry_id, count=1)
                    pipe.xpending_range(stream, group, entry_id, entry_id, 1)
                found = await pipe.execute()
            gone = [i for i, rows, owner in zip(candidates, found[::2], found[1::2])
                    if not rows and owner and _text(owner[0]["consumer"]) == consumer]
            if gone:
                await self.client.xack(stream, group, *gone)

    async def claim_owned(self, stream: str, group: str, consumer: str,
                          ids: Sequence[bytes]) -> list[Entry]:
        if not ids:
            return []
        rows = cast("list[tuple[bytes, list[bytes]]]",
                    await self._claim_owned([stream], [group, consumer, *ids]))
        return [Entry(i, dict(zip(flat[::2], flat[1::2]))) for i, flat in rows]

    async def release(self, stream: str, group: str, consumer: str, ids: Sequence[bytes],
                      idle_ms: int) -> None:
        if not ids:
            return
        # Keep ownership but back-date the delivery so any peer may take them at once.
        await self._release_owned([stream], [group, consumer, idle_ms, *ids])

    async def pending(self, stream: str, group: str, count: int, consumer: str | None = None,
                      start: bytes = b"-", end: bytes = b"+") -> list[PendingEntry]:
        with mapped_errors():
            rows = cast("list[_PendingRow]", await self.client.xpending_range(
                stream, group, start, end, count, consumername=consumer))
        return [PendingEntry(r["message_id"], _text(r["consumer"]),
                             int(r["time_since_delivered"]), int(r["times_delivered"]))
                for r in rows]

    async def consumers(self, stream: str, group: str) -> list[ConsumerInfo]:
        try:
            with mapped_errors():
                rows = await self.client.xinfo_consumers(stream, group)
        except TransportError as exc:
            # XINFO says "no such key", not NOGROUP, when the stream itself is gone.
            if "no such key" in str(exc).lower():
                raise GroupMissing(str(exc)) from exc
            raise
        return [ConsumerInfo(_text(r["name"]), int(r["pending"]), int(r["idle"])) for r in rows]

    async def groups(self, stream: str) -> list[GroupInfo]:
        try:
            with mapped_errors():
                rows = await self.client.xinfo_groups(stream)
        except TransportError as exc:
            if "no such key" in str(exc).lower():
                return []
            raise
        groups = []
        for r in rows:
            lag = r.get("lag")
            if lag is None:  # not reported (Redis 6.2): count, up to a cap
                lag = await self._count_after([stream], [r["last-delivered-id"], LAG_COUNT_CAP])
            groups.append(GroupInfo(_text(r["name"]), int(r["consumers"]), int(r["pending"]),
                                    r["last-delivered-id"], int(lag)))
        return groups

    async def delete_idle_consumer(self, stream: str, group: str, consumer: str) -> bool:
        return bool(await self._delete_consumer([stream], [group, consumer]))

    async def trim_min_id(self, stream: str, min_id: bytes) -> int:
        with mapped_errors():
            trimmed: int = await self.client.xtrim(stream, minid=min_id, approximate=False)
        return trimmed

    async def dedup_seen(self, dedup: str, message_ids: Sequence[str], now_ms: int) -> list[bool]:
        if not message_ids:
            return []
        with mapped_errors():
            scores = await self.client.zmscore(dedup, list(message_ids))
        return [s is not None and s > now_ms for s in scores]

    async def length(self, stream: str) -> int:
        with mapped_errors():
            length: int = await self.client.xlen(stream)
        return length

    async def range(self, stream: str, start: bytes | str, end: bytes | str,
                    count: int | None = None, reverse: bool = False) -> list[Entry]:
        with mapped_errors():
            if reverse:
                rows = await self.client.xrevrange(stream, end, start, count=count)
            else:
                rows = await self.client.xrange(stream, start, end, count=count)
        return _entries(rows)

    async def read(self, stream: str, after: bytes, count: int,
                   block_ms: int | None) -> list[Entry]:
        # Packed, as group reads: the reply router reads this way for every batch of replies.
        return await packed_read(self._connections, stream, after, count, block_ms)

    async def delete_entries(self, stream: str, ids: Sequence[bytes]) -> int:
        if not ids:
            return 0
        return await packed_delete(self._connections, stream, ids)

    async def move_back(self, dead_letters: str, stream: str, entry_id: bytes,
                        data: bytes) -> bytes:
        with mapped_errors():
            # Same hash tag, so one MULTI keeps "re-added" and "removed" together.
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(stream, {b"e": data})
                pipe.xdel(dead_letters, entry_id)
                new_id, _ = await pipe.execute()
        return new_id  # type: ignore[no-any-return]

    # -- plain keys ---------------------------------------------------------------------
    async def delete_keys(self, *keys: str) -> int:
        with mapped_errors():
            deleted: int = await self.client.delete(*keys)
        return deleted

    async def put_ttl(self, key: str, data: bytes, ttl_ms: int) -> None:
        with mapped_errors():
            await self.client.set(key, data, px=ttl_ms)

    async def expire(self, key: str, ttl_ms: int) -> bool:
        with mapped_errors():
            return bool(await self.client.pexpire(key, ttl_ms))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with mapped_errors():
            # One GET per key in a pipeline: the keys may live on different cluster slots.
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                values: list[bytes | None] = await pipe.execute()
        return values

    async def index_add(self, key: str, member: str, score: int) -> None:
        with mapped_errors():
            await self.client.zadd(key, {member: score})

    async def index_members(self, key: str) -> list[tuple[str, int]]:
        with mapped_errors():
            rows = cast("list[tuple[bytes, float]]",
                        await self.client.zrange(key, 0, -1, withscores=True))
        return [(_text(m), int(s)) for m, s in rows]

    async def index_remove(self, key: str, *members: str) -> None:
        if members:
            with mapped_errors():
                await self.client.zrem(key, *members)

    async def set_add(self, key: str, *members: str) -> None:
        if members:
            with mapped_errors():
                await self.client.sadd(key, *members)

    async def set_members(self, key: str) -> list[str]:
        with mapped_errors():
            return sorted(_text(m) for m in await self.client.smembers(key))

    async def ping(self) -> None:
        with mapped_errors():
            await self.client.ping()

    def piggyback(self, source: PiggybackSource) -> Callable[[], None]:
        # Blocking group reads carry what ``source`` holds (see Connections.call_blocking).
        return self._connections.piggyback(source)

    async def close(self) -> None:
        await self._connections.close()
        await self.client.aclose()
