"""The seam between the engine and Redis: the engine only sees this Protocol.

Stream ids are ``bytes`` as Redis returns them; entry fields are ``dict[bytes, bytes]``, or
``None`` for an entry that was deleted while pending.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

Fields = Mapping[bytes, bytes]


class Entry(NamedTuple):
    """One stream entry."""

    id: bytes
    fields: dict[bytes, bytes] | None


class PendingEntry(NamedTuple):
    """One entry of a group's pending list."""

    id: bytes
    consumer: str
    idle_ms: int
    deliveries: int


class ConsumerInfo(NamedTuple):
    """One consumer of a group."""

    name: str
    pending: int
    idle_ms: int


class GroupInfo(NamedTuple):
    """One consumer group of a stream."""

    name: str
    consumers: int
    pending: int
    last_delivered: bytes
    lag: int | None  # None on servers that do not report it (Redis < 7)


class ClaimBatch(NamedTuple):
    """The result of one idle-claim round."""

    cursor: bytes
    entries: list[Entry]
    deleted: list[bytes]  # ids that were pending but whose entry is gone


class AckWrite(NamedTuple):
    """XACK of ``ids``, sent along with a read (see :class:`Piggyback`)."""

    stream: str
    group: str
    ids: Sequence[bytes]


class AppendWrite(NamedTuple):
    """One entry appended to ``stream``, sent along with a read (see :class:`Piggyback`)."""

    stream: str
    data: bytes


class Piggyback(NamedTuple):
    """A write to send in the same round trip as a blocking read, and what to call with its
    outcome: ``None`` once Redis applied it, else the error (a TransportError; the write may
    or may not have been applied). ``done`` runs in the reading task and must not block."""

    write: AckWrite | AppendWrite
    done: Callable[[BaseException | None], None]


#: Polled right before a blocking read is sent; returns what should ride along, if anything.
PiggybackSource = Callable[[], Piggyback | None]


class StreamTransport(Protocol):
    """Stream and key operations the engine needs. Errors are mapped to :mod:`errors`."""

    version: tuple[int, int, int]

    async def add(self, stream: str, data: bytes) -> bytes: ...
    async def add_many(self, stream: str, datas: Sequence[bytes]) -> list[bytes]: ...
    async def add_capped(self, stream: str, datas: Sequence[bytes], maxlen: int,
                         ttl_ms: int) -> list[bytes]:
        """Append to a capped stream (``MAXLEN ~ maxlen``) and (re)set its time to live."""
    async def add_expiring(self, stream: str, data: bytes, ttl_ms: int) -> bytes:
        """Append one entry and (re)set the stream's time to live, atomically."""
    async def ensure_group(self, stream: str, group: str) -> None: ...
    async def read_group(self, stream: str, group: str, consumer: str, count: int,
                         block_ms: int | None, history_after: bytes | None = None) -> list[Entry]:
        """Read new entries, or (``history_after`` set) this consumer's own pending ones."""
    async def ack(self, stream: str, group: str, ids: Sequence[bytes]) -> int: ...
    async def ack_checked(self, stream: str, dedup: str, group: str, consumer: str,
                          pairs: Sequence[tuple[bytes, str]], check_owner: bool,
                          window_ms: int, now_ms: int) -> list[bytes]: ...
    async def renew(self, stream: str, group: str, consumer: str,
                    ids: Sequence[bytes]) -> list[bytes]: ...
    async def dead_letter(self, stream: str, dead_letters: str, group: str, consumer: str,
                          entry_id: bytes, fields: Mapping[str, bytes | str]) -> bytes | None: ...
    async def claim_idle(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                         cursor: bytes, count: int) -> ClaimBatch: ...
    async def claim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                    ids: Sequence[bytes]) -> list[Entry]: ...
    async def claim_owned(self, stream: str, group: str, consumer: str,
                          ids: Sequence[bytes]) -> list[Entry]:
        """Claim again (delivery counter + 1) those of ``ids`` this consumer still owns; an
        owned entry deleted while pending is acked. Entries a peer took over are left alone."""
    async def release(self, stream: str, group: str, consumer: str, ids: Sequence[bytes],
                      idle_ms: int) -> None:
        """Back-date the delivery of those of ``ids`` this consumer still owns, so a peer may
        take them at once; entries a peer took over are left alone."""
    async def pending(self, stream: str, group: str, count: int, consumer: str | None = None,
                      start: bytes = b"-", end: bytes = b"+") -> list[PendingEntry]: ...
    async def consumers(self, stream: str, group: str) -> list[ConsumerInfo]: ...
    async def groups(self, stream: str) -> list[GroupInfo]: ...
    async def delete_idle_consumer(self, stream: str, group: str, consumer: str) -> bool: ...
    async def trim_min_id(self, stream: str, min_id: bytes) -> int: ...
    async def dedup_seen(self, dedup: str, message_ids: Sequence[str], now_ms: int) -> list[bool]: ...
    async def length(self, stream: str) -> int: ...
    async def range(self, stream: str, start: bytes | str, end: bytes | str,
                    count: int | None = None, reverse: bool = False) -> list[Entry]: ...
    async def read(self, stream: str, after: bytes, count: int,
                   block_ms: int | None) -> list[Entry]: ...
    async def delete_entries(self, stream: str, ids: Sequence[bytes]) -> int: ...
    async def move_back(self, dead_letters: str, stream: str, entry_id: bytes,
                        data: bytes) -> bytes: ...
    async def delete_keys(self, *keys: str) -> int: ...
    async def put_ttl(self, key: str, data: bytes, ttl_ms: int) -> None: ...
    async def expire(self, key: str, ttl_ms: int) -> bool:
        """(Re)set the time to live of an existing key; False when there is no such key."""
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def index_add(self, key: str, member: str, score: int) -> None: ...
    async def index_members(self, key: str) -> list[tuple[str, int]]: ...
    async def index_remove(self, key: str, *members: str) -> None: ...
    async def set_add(self, key: str, *members: str) -> None: ...
    async def set_members(self, key: str) -> list[str]: ...
    async def ping(self) -> None: ...
    def piggyback(self, source: PiggybackSource) -> Callable[[], None]:
        """Poll ``source`` before each blocking read and send what it returns in the same
        write; returns the function that stops the polling. An optimisation a transport may
        ignore (then ``source`` is never polled): callers still write on their own."""
    async def close(self) -> None: ...
