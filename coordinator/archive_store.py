"""Archive stores: lifecycle events as JSON records, the store protocol, and the JSON Lines
file store (one file per UTC day, idempotent by event id). The PostgreSQL store lives in
``archive_postgres``; :mod:`coordinator.archive` runs them from a consumer group."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import msgspec

from .config import PersistenceConfig
from .envelope import AgentEvent
from .errors import CodecError, ConfigError, CoordinatorError
from .events import matches

log = logging.getLogger("coordinator.archive")

_DAY_FILE = re.compile(r"^events-(\d{4}-\d{2}-\d{2})\.jsonl$")


class ArchiveUnavailable(CoordinatorError):
    """The store cannot be written right now (database down, disk full): try again later."""


# -- records as JSON ----------------------------------------------------------------------------


class EventRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One archived event as JSON (a line of a day file, a row of the table)."""

    id: str
    type: str
    created: str
    created_ms: int
    agent_id: str | None = None
    node_id: str | None = None
    session_id: str | None = None
    message_id: str | None = None
    stream_id: str = ""
    traceparent: str | None = None
    data: dict[str, Any] = {}


class _IdOnly(msgspec.Struct):
    id: str


def _fallback(obj: Any) -> Any:
    """JSON for what msgpack decodes and JSON lacks (extension types): its text."""
    if isinstance(obj, msgspec.msgpack.Ext):
        return {"msgpack_ext": obj.code, "data": obj.data}
    return str(obj)


_json = msgspec.json.Encoder(enc_hook=_fallback)
_record_decoder = msgspec.json.Decoder(EventRecord)
_id_decoder = msgspec.json.Decoder(_IdOnly)


def iso_ms(ms: int) -> str:
    """``2024-05-01T12:00:00.123Z`` for epoch milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_record(event: AgentEvent) -> EventRecord:
    """The JSON record of ``event``."""
    return EventRecord(id=event.id, type=event.type, created=iso_ms(event.created_ms),
                       created_ms=event.created_ms, agent_id=event.agent_id,
                       node_id=event.node_id, session_id=event.session_id,
                       message_id=event.message_id, stream_id=event.stream_id,
                       traceparent=event.traceparent, data=dict(event.data))


def from_record(record: EventRecord) -> AgentEvent:
    """The event an archived record holds."""
    return AgentEvent(id=record.id, type=record.type, agent_id=record.agent_id,
                      node_id=record.node_id, session_id=record.session_id,
                      message_id=record.message_id, created_ms=record.created_ms,
                      traceparent=record.traceparent, data=record.data,
                      stream_id=record.stream_id)


def encode_line(event: AgentEvent) -> bytes:
    """One JSON line (with its newline) for ``event``.

    :raises CodecError: when the event cannot be written as JSON
    """
    try:
        return _json.encode(to_record(event)) + b"\n"
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise CodecError(f"event {event.id} cannot be archived as JSON: {exc}") from exc


# -- stores -------------------------------------------------------------------------------------


class ArchiveStore(Protocol):
    """Where events are archived. Writes are idempotent by event id."""

    async def write(self, events: list[AgentEvent]) -> int:
        """Store ``events``; returns how many were new.

        :raises ArchiveUnavailable: the store cannot be reached or written now
        """
        ...

    def read(self, *, since_ms: int | None = None, until_ms: int | None = None,
             session_id: str | None = None, types: Collection[str] | None = None,
             agent_id: str | None = None) -> AsyncIterator[AgentEvent]:
        """Archived events with ``since_ms <= created_ms < until_ms``, oldest first."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


class _DayIndex:
    __slots__ = ("ids", "offset")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.offset = 0


def _day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


class FileArchive:
    """Events as JSON Lines, one file per UTC day of their creation time.

    :param directory: created if missing
    :param fsync: flush every batch to disk before it is acknowledged
    :param cached_days: day indexes kept in memory (older ones are re-read when needed)
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 cached_days: int = 4) -> None:
        self.directory = Path(directory)
        self._fsync = fsync
        self._cached_days = cached_days
        self._days: OrderedDict[str, _DayIndex] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, day: str) -> Path:
        """The file of one UTC day (``YYYY-MM-DD``)."""
        return self.directory / f"events-{day}.jsonl"

    async def write(self, events: list[AgentEvent]) -> int:
        lines: dict[str, list[tuple[str, bytes]]] = {}
        for event in events:
            lines.setdefault(_day_of(event.created_ms), []).append((event.id, encode_line(event)))
        return await anyio.to_thread.run_sync(self._write_days, lines)

    def _write_days(self, lines: dict[str, list[tuple[str, bytes]]]) -> int:
        written = 0
        with self._lock:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for day, items in sorted(lines.items()):
                    written += self._append(day, items)
            except OSError as exc:
                raise ArchiveUnavailable(f"cannot write {self.directory}: {exc}") from exc
        return written

    def _index(self, day: str) -> _DayIndex:
        index = self._days.pop(day, None) or _DayIndex()
        self._days[day] = index  # most recent last
        while len(self._days) > self._cached_days:
            self._days.popitem(last=False)
        return index

    def _append(self, day: str, items: list[tuple[str, bytes]]) -> int:
        path = self.path_of(day)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self._index(day)
            self._catch_up(fd, index, path)
            fresh: list[bytes] = []
            for event_id, line in items:
                if event_id not in index.ids:
                    index.ids.add(event_id)
                    fresh.append(line)
            if fresh:
                data = memoryview(b"".join(fresh))
                while data:
                    data = data[os.write(fd, data):]
                if self._fsync:
                    os.fsync(fd)
                index.offset = os.fstat(fd).st_size
            if created and self._fsync:
                _fsync_dir(self.directory)
            return len(fresh)
        except BaseException:
            self._days.pop(day, None)  # re-read from the file next time
            raise
        finally:
            os.close(fd)  # releases the lock

    def _catch_up(self, fd: int, index: _DayIndex, path: Path) -> None:
        """Index what was appended since we last looked (by us or another process); cut a
        torn last line (a crash mid-append: that event was not acknowledged)."""
        size = os.fstat(fd).st_size
        if size < index.offset:  # truncated or replaced under us: start over
            index.ids.clear()
            index.offset = 0
        position = index.offset
        tail = b""
        while position < size:
            chunk = os.pread(fd, min(1 << 20, size - position), position)
            if not chunk:
                break
            position += len(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                self._index_line(index, line, path)
        if tail:
            log.warning("cutting a torn last line (%d bytes) of %s", len(tail), path)
            size -= len(tail)
            os.ftruncate(fd, size)
        index.offset = size

    @staticmethod
    def _index_line(index: _DayIndex, line: bytes, path: Path) -> None:
        if not line.strip():
            return
        try:
            index.ids.add(_id_decoder.decode(line).id)
        except msgspec.DecodeError:
            log.warning("skipping an unreadable line of %s", path)

    async def read(self, *, since_ms: int | None = None, until_ms: int | None = None,
                   session_id: str | None = None, types: Collection[str] | None = None,
                   agent_id: str | None = None) -> AsyncIterator[AgentEvent]:
        first = _day_of(since_ms) if since_ms is not None else None
        last = _day_of(until_ms) if until_ms is not None else None
        wanted = None if types is None else set(types)
        for day, path in self.day_files():
            if (first and day < first) or (last and day > last):
                continue
            events = await anyio.to_thread.run_sync(self._read_day, path, since_ms, until_ms,
                                                    session_id, wanted, agent_id)
            for event in events:
                yield event

    def day_files(self) -> list[tuple[str, Path]]:
        """``(day, path)`` of every day file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _DAY_FILE.match(path.name)
            if match:
                found.append((match.group(1), path))
        return sorted(found)

    @staticmethod
    def _read_day(path: Path, since_ms: int | None, until_ms: int | None,
                  session_id: str | None, types: set[str] | None,
                  agent_id: str | None) -> list[AgentEvent]:
        events: dict[str, AgentEvent] = {}
        with open(path, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break  # torn by a crash; cut at the next append
                try:
                    record = _record_decoder.decode(line)
                except msgspec.DecodeError:
                    continue
                if ((since_ms is not None and record.created_ms < since_ms)
                        or (until_ms is not None and record.created_ms >= until_ms)):
                    continue
                event = from_record(record)
                if matches(event, types, agent_id, session_id):
                    events.setdefault(event.id, event)
        return sorted(events.values(), key=lambda e: (e.created_ms, e.stream_id))

    async def close(self) -> None:
        self._days.clear()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # not supported by every file system
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def open_store(persistence: PersistenceConfig) -> ArchiveStore:
    """The store ``persistence`` configures.

    :raises ConfigError: storage is ``redis`` (no archive), or psycopg is missing
    """
    if persistence.storage == "filesystem" and persistence.directory:
        return FileArchive(persistence.directory)
    if persistence.storage == "postgres" and persistence.postgres_url:
        try:
            from .archive_postgres import PostgresArchive
        except ImportError as exc:
            raise ConfigError("persistence.storage: 'postgres' needs psycopg 3: pip install "
                              f"'kiki-coordinator[postgres]' ({exc})") from None
        return PostgresArchive(persistence.postgres_url)
    raise ConfigError(f"persistence.storage: {persistence.storage!r} keeps no archive "
                      "(use filesystem with a directory, or postgres with a postgres_url)")
