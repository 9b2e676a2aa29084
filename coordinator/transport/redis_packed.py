"""The hot commands sent without redis-py's command layer or pool: the connections they go
over, and stream reads (XREADGROUP, XREAD), acks (XACK) and deletes (XDEL). Scripted writes
(appends, every Lua script) are packed in :mod:`.packed_scripts`.

For these fixed command shapes, a read packed here skips redis-py's retry, parse and callback
layers, which cost a blocking read tens of microseconds of latency.

Acks and appends waiting when a blocking read goes out ride along with it, in the same write
(:meth:`Connections.call_blocking`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection

from ..errors import TransportError
from .deadlines import Deadlines
from .protocol import AckWrite, Entry, Piggyback, PiggybackSource
from .redis_errors import mapped_error, mapped_errors


#: How long a cancelled blocking read still waits for its riders' replies.
RIDERS_GRACE_S = 0.5


class Connections:
    """Connections for the hand-packed commands, kept apart from redis-py's pool.

    Taking a connection from redis-py 8's pool costs ~30 us (a lock, a timeout, a socket
    check and connection-count bookkeeping on every take and release): more than handling a
    batch of messages. Here an idle connection is a list pop. One that fails is dropped with
    every idle one (they most likely died together, as in a Redis restart); one idle for over
    a second is checked before use, as redis-py's pool checks every time.

    The socket timeout is enforced here (:class:`Deadlines`): redis-py's costs a task per
    write (``asyncio.wait_for``) plus a timer per read, and delays each write by a loop pass.

    :param pool: whose connection settings (address, password, timeouts, protocol) to use
    :param limit: connections open at most; beyond, callers wait for one to be given back
    """

    _CHECK_IDLE_S = 1.0

    def __init__(self, pool: aioredis.ConnectionPool, limit: int) -> None:
        settings = dict(pool.connection_kwargs)
        self._timeout_s: float | None = settings.pop("socket_timeout", None)
        self._deadlines = Deadlines(self._timeout_s) if self._timeout_s else None
        self._make = cast(Callable[[], AbstractConnection], functools.partial(
            pool.connection_class, **settings, socket_timeout=None))
        self._limit = limit
        self._idle: list[tuple[AbstractConnection, float]] = []
        self._open: set[AbstractConnection] = set()
        self._given_back = anyio.Event()
        self._waiting = 0  # callers waiting for a connection (at the limit)
        self._sources: list[PiggybackSource] = []

    async def take(self) -> AbstractConnection:
        """An idle connection, or a new one (connected by its first command)."""
        while True:
            if self._idle:
                conn, since = self._idle.pop()
                if time.monotonic() - since < self._CHECK_IDLE_S or await self._usable(conn):
                    return conn
                continue
            if len(self._open) < self._limit:
                conn = self._make()
                self._open.add(conn)
                return conn
            self._waiting += 1
            try:
                await self._given_back.wait()
            finally:
                self._waiting -= 1

    def give(self, conn: AbstractConnection) -> None:
        """Take back a connection whose replies were all read."""
        if conn in self._open:
            self._idle.append((conn, time.monotonic()))
            self._wake_waiting()

    async def drop(self, conn: AbstractConnection) -> None:
        """Forget a connection that failed, and the idle ones: likely dead as well."""
        doomed = [conn, *(idle for idle, _ in self._idle)]
        self._idle.clear()
        for each in doomed:
            self._open.discard(each)
        self._wake_waiting()
        for each in doomed:
            await each.disconnect()

    def _wake_waiting(self) -> None:
        if self._waiting:  # an event costs ~2.5 us to make: not on every give
            self._given_back.set()
            self._given_back = anyio.Event()

    async def _usable(self, conn: AbstractConnection) -> bool:
        # redis-py 8 renamed the check; 5.x only has the old name.
        check = getattr(conn, "can_read", None) or conn.can_read_destructive
        try:
            if not await check():  # readable means closed, or stray data
                return True
        except (rex.ConnectionError, rex.TimeoutError, OSError):
            pass
        self._open.discard(conn)
        await conn.disconnect()
        return False

    async def close(self) -> None:
        """Disconnect every connection (the transport is closing)."""
        conns, self._open, self._idle = list(self._open), set(), []
        for conn in conns:
            await conn.disconnect()

    def _watch(self, conn: AbstractConnection, held_s: float = 0.0) -> None:
        """Start the time limit of an exchange on ``conn``; ``held_s``: how long the server
        may hold the reply on purpose (a blocking read)."""
        if self._deadlines is not None:
            self._deadlines.start(conn, held_s)

    def _done(self, conn: AbstractConnection) -> None:
        """The exchange on ``conn`` is over: stop its time limit and take ``conn`` back."""
        if self._deadlines is not None:
            self._deadlines.end(conn)
        self.give(conn)

    def _failure(self, conn: AbstractConnection, exc: BaseException) -> BaseException:
        """Stop the time limit of the exchange ``exc`` broke off: a ``TimeoutError`` when the
        limit cancelled it."""
        if self._deadlines is None:
            return exc
        return self._deadlines.failure(conn, exc) or exc

    async def drop_after(self, conn: AbstractConnection, exc: BaseException) -> NoReturn:
        """Drop ``conn`` after a failed exchange (replies may be left unread on it) and raise
        ``exc``, a timeout as redis-py's own."""
        await self.drop(conn)
        if isinstance(exc, TimeoutError):
            raise rex.TimeoutError(f"no reply within {self._timeout_s:g} s") from None
        raise exc

    async def call(self, packed: bytes) -> Any:
        """Send one hand-packed command and return its reply (see :meth:`exchange`).

        :raises TransportError: mapped from the Redis error (NOGROUP, connection lost...)
        """
        return unless_error((await self.exchange(packed))[0])

    async def exchange(self, packed: bytes, count: int = 1) -> list[Any]:
        """Send ``count`` commands packed together; their replies in order, an error reply
        as its ``ResponseError`` (read in full: the connection stays in step).

        :raises TransportError: the exchange failed (connection lost, no reply in time)
        """
        with mapped_errors():
            conn = await self.take()
            self._watch(conn)
            try:
                await conn.send_packed_command(packed, check_health=False)
                replies = await _read(conn, count)
            except BaseException as exc:
                await self.drop_after(conn, self._failure(conn, exc))
            self._done(conn)
        return replies

    def piggyback(self, source: PiggybackSource) -> Callable[[], None]:
        """Poll ``source`` before each blocking read (see :meth:`call_blocking`); returns the
        function that stops the polling."""
        self._sources.append(source)
        return functools.partial(self._stop_polling, source)

    def _stop_polling(self, source: PiggybackSource) -> None:
        with contextlib.suppress(ValueError):
            self._sources.remove(source)

    async def call_blocking(self, packed: bytes, wait_s: float) -> Any:
        """Send one command the server may hold for up to ``wait_s`` (a blocking read) and
        return its reply.

        What the piggyback sources hold now goes in the same write, ahead of it, and their
        replies are read first. Handlers that just ran have queued their acks and lifecycle
        events: at low rates this spares each its own round trip (a write, and a wake-up of
        the server, of this process and of the task that would have sent it).

        :raises TransportError: mapped from the Redis error (NOGROUP, connection lost...)
        """
        riders = [ride for source in self._sources if (ride := source()) is not None]
        told = 0  # riders told their outcome
        with mapped_errors():
            try:
                conn = await self.take()
            except BaseException as exc:
                _tell(riders, _failure_of(exc, self._timeout_s))  # nothing of theirs was sent
                raise
            self._watch(conn, wait_s)
            sent = False
            try:
                await conn.send_packed_command([*map(_packed, riders), packed],
                                               check_health=False)
                sent = True
                for ride in riders:
                    await _hear(conn, ride)
                    told += 1
                reply = await _read_one(conn)
            except BaseException as exc:
                exc = self._failure(conn, exc)
                if sent and isinstance(exc, anyio.get_cancelled_exc_class()):
                    told += await _hear_out(conn, riders[told:])
                _tell(riders[told:], _failure_of(exc, self._timeout_s))
                await self.drop_after(conn, exc)
            self._done(conn)
        return unless_error(reply)


def unless_error(reply: Any) -> Any:
    """``reply``, or its error raised as the coordinator's exception."""
    if isinstance(reply, rex.ResponseError):
        raise mapped_error(reply)
    return reply


def _packed(ride: Piggyback) -> bytes:
    write = ride.write
    if isinstance(write, AckWrite):
        return pack_command(["XACK", write.stream, write.group, *write.ids])
    return pack_command(["XADD", write.stream, "*", "e", write.data])


async def _hear(conn: AbstractConnection, ride: Piggyback) -> None:
    """Read the reply to ``ride``'s write and tell it the outcome."""
    reply = await _read_one(conn)
    ride.done(mapped_error(reply) if isinstance(reply, rex.ResponseError) else None)


async def _hear_out(conn: AbstractConnection, riders: list[Piggyback]) -> int:
    """After a blocking read was cancelled (a consumer stopping): read its riders' replies,
    which come at once, ahead of the read's. Told that it failed, a rider whose write was done
    would write again (its lifecycle events twice). Returns how many were told."""
    heard = 0
    with anyio.CancelScope(shield=True), anyio.move_on_after(RIDERS_GRACE_S):
        with contextlib.suppress(rex.RedisError, OSError):
            for ride in riders:
                await _hear(conn, ride)
                heard += 1
    return heard


def _tell(riders: list[Piggyback], failure: TransportError) -> None:
    """Tell riders their write failed."""
    for ride in riders:
        ride.done(failure)


def _failure_of(exc: BaseException, timeout_s: float | None) -> TransportError:
    """What riders are told when the exchange failed (cancelled included): the write may or
    may not have been applied."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, TimeoutError):
        return mapped_error(rex.TimeoutError(f"no reply within {timeout_s:g} s"))
    if isinstance(exc, rex.RedisError | OSError):
        return mapped_error(exc)
    return mapped_error(rex.ConnectionError("cancelled before the reply was read"))


async def _read(conn: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies (see :func:`_read_one`)."""
    return [await _read_one(conn) for _ in range(count)]


async def _read_one(conn: AbstractConnection) -> Any:
    """The next reply; an error reply as its ``ResponseError``. A failed read leaves ``conn``
    connected: its exchange drops it, after reading what it still can (:func:`_hear_out`)."""
    try:
        return await conn.read_response(disconnect_on_error=False)
    except rex.ResponseError as exc:  # read in full: the connection is fine
        return exc


async def read_group(connections: Connections, stream: str, group: str, consumer: str,
                     count: int, block_ms: int | None, after: bytes) -> list[Entry]:
    """XREADGROUP of one stream (``after``: ``>`` for new entries, else an id of our own
    pending list); an entry deleted while pending comes back with ``fields`` None.

    :raises TransportError: mapped from the Redis error (NOGROUP, connection lost...)
    """
    args: list[bytes | str | int] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    return await _read_stream(connections, args, stream, after, block_ms)


async def read(connections: Connections, stream: str, after: bytes, count: int,
               block_ms: int | None) -> list[Entry]:
    """XREAD of one stream: the entries after ``after``.

    :raises TransportError: mapped from the Redis error (WRONGTYPE, connection lost...)
    """
    return await _read_stream(connections, ["XREAD", "COUNT", count], stream, after, block_ms)


async def _read_stream(connections: Connections, args: list[bytes | str | int], stream: str,
                       after: bytes, block_ms: int | None) -> list[Entry]:
    """Send a read command of one stream (``args`` up to its options), blocking for up to
    ``block_ms`` when given; its entries."""
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    args += ["STREAMS", stream, after]
    if block_ms is None:
        reply = await connections.call(pack_command(args))
    else:
        reply = await connections.call_blocking(pack_command(args), block_ms / 1000)
    if not reply:
        return []
    # RESP3 (redis-py's default from 8.0) sends a map stream -> rows, RESP2 [[stream, rows]].
    rows = cast("list[list[Any]]",
                next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1])
    new = tuple.__new__  # Entry(...) goes through a Python-level __new__: twice the cost
    return [new(Entry, (entry_id, _fields(raw))) for entry_id, raw in rows]


async def delete(connections: Connections, stream: str, ids: Sequence[bytes]) -> int:
    """XDEL of ``ids``; returns how many were deleted.

    :raises TransportError: mapped from the Redis error
    """
    return cast(int, await connections.call(pack_command(["XDEL", stream, *ids])))


async def ack(connections: Connections, stream: str, group: str, ids: Sequence[bytes]) -> int:
    """XACK of ``ids``; returns how many were pending. Packed here: redis-py encodes each
    argument through its generic encoder and command layer, several times the cost.

    :raises TransportError: mapped from the Redis error
    """
    return cast(int, await connections.call(pack_command(["XACK", stream, group, *ids])))


def pack_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command in the Redis protocol (RESP), arguments as bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _fields(raw: list[bytes] | None) -> dict[bytes, bytes] | None:
    if not raw:
        return None
    if len(raw) == 2:  # the usual one field
        return {raw[0]: raw[1]}
    return dict(zip(raw[::2], raw[1::2]))
