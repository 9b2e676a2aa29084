"""The PostgreSQL archive store (psycopg 3, async): the ``postgres`` extra.

One table, created if missing::

    CREATE TABLE kiki_events (
        id text PRIMARY KEY, type text NOT NULL, agent_id text, node_id text,
        session_id text, message_id text, created timestamptz NOT NULL, stream_id text,
        traceparent text, data jsonb NOT NULL DEFAULT '{}');
    -- indexes on (session_id, created) and (created)

Inserts are batched in one transaction and idempotent (``ON CONFLICT (id) DO NOTHING``). A
connection that fails is dropped and opened again on the next write; connection-level errors
raise :class:`~coordinator.archive.ArchiveUnavailable` (the archiver waits and retries), errors
about the data itself do not.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection
from datetime import datetime, timezone
from typing import Any

import anyio
import msgspec
import psycopg

from .archive_store import ArchiveUnavailable, _json
from .config import mask_url
from .envelope import AgentEvent
from .errors import ConfigError

__all__ = ["PostgresArchive"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresArchive:
    """Archives events into a PostgreSQL table.

    :param url: ``postgresql://user:password@host:port/db``
    :param table: the table name (created with its indexes if missing)
    :param connect_timeout_s: give up connecting after this long (then: unavailable)
    """

    def __init__(self, url: str, *, table: str = "kiki_events",
                 connect_timeout_s: float = 5.0) -> None:
        if not _IDENT.match(table):
            raise ConfigError(f"archive table {table!r}: expected a plain SQL identifier")
        self.url = url
        self.table = table
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = anyio.Lock()
        self._insert = (
            f"INSERT INTO {table} (id, type, agent_id, node_id, session_id, message_id, "
            "created, stream_id, traceparent, data) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb) "
            "ON CONFLICT (id) DO NOTHING")

    def __repr__(self) -> str:
        return f"PostgresArchive({mask_url(self.url)!r}, table={self.table!r})"

    def _schema(self) -> list[str]:
        t = self.table
        return [
            f"CREATE TABLE IF NOT EXISTS {t} (id text PRIMARY KEY, type text NOT NULL, "
            "agent_id text, node_id text, session_id text, message_id text, "
            "created timestamptz NOT NULL, stream_id text, traceparent text, "
            "data jsonb NOT NULL DEFAULT '{}'::jsonb)",
            f"CREATE INDEX IF NOT EXISTS {t}_session_created ON {t} (session_id, created)",
            f"CREATE INDEX IF NOT EXISTS {t}_created ON {t} (created)",
        ]

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        conn = await psycopg.AsyncConnection.connect(
            self.url, connect_timeout=max(1, int(self._connect_timeout_s)))
        try:
            async with conn.transaction():
                for statement in self._schema():
                    await conn.execute(statement)
        except BaseException:
            # Another process creating the table at the same moment fails us too: the next
            # attempt finds it.
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await conn.close()
                except psycopg.Error:
                    pass

    async def write(self, events: list[AgentEvent]) -> int:
        rows = [_row(event) for event in events]
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction():
                    async with conn.cursor() as cursor:
                        await cursor.executemany(self._insert, rows)
                        new = cursor.rowcount
            except (psycopg.DataError, psycopg.IntegrityError):
                raise  # about these rows, not the database: the archiver isolates them
            except (psycopg.Error, OSError) as exc:
                # Down, restarting, unreachable, out of disk, no permission: wait it out.
                await self._drop()
                raise ArchiveUnavailable(f"postgres {mask_url(self.url)}: "
                                         f"{_first_line(exc)}") from exc
        return max(new, 0)

    async def read(self, *, since_ms: int | None = None, until_ms: int | None = None,
                   session_id: str | None = None, types: Collection[str] | None = None,
                   agent_id: str | None = None) -> AsyncIterator[AgentEvent]:
        where: list[str] = []
        params: list[datetime | str | list[str]] = []
        if since_ms is not None:
            where.append("created >= %s")
            params.append(_moment(since_ms))
        if until_ms is not None:
            where.append("created < %s")
            params.append(_moment(until_ms))
        if session_id is not None:
            where.append("session_id = %s")
            params.append(session_id)
        if agent_id is not None:
            where.append("agent_id = %s")
            params.append(agent_id)
        if types is not None:
            where.append("type = ANY(%s)")
            params.append(list(types))
        sql = (f"SELECT id, type, agent_id, node_id, session_id, message_id, "
               f"round(extract(epoch FROM created) * 1000)::bigint, stream_id, traceparent, "
               f"data::text FROM {self.table}"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created, stream_id, id")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, int(self._connect_timeout_s)))
        except psycopg.OperationalError as exc:
            raise ArchiveUnavailable(f"postgres {mask_url(self.url)}: "
                                     f"{_first_line(exc)}") from exc
        try:
            async with conn.cursor(name="kiki_read") as cursor:
                try:
                    await cursor.execute(sql, params)
                except psycopg.errors.UndefinedTable:
                    return
                async for row in cursor:
                    yield AgentEvent(id=row[0], type=row[1], agent_id=row[2], node_id=row[3],
                                     session_id=row[4], message_id=row[5],
                                     created_ms=int(row[6]), stream_id=row[7] or "",
                                     traceparent=row[8], data=msgspec.json.decode(row[9]))
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def close(self) -> None:
        await self._drop()


def _moment(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _row(event: AgentEvent) -> tuple[Any, ...]:
    # jsonb refuses the NUL character; keep the rest of the text as it was.
    data = _json.encode(event.data).replace(b"\\u0000", b"\\ufffd").decode()
    return (event.id, event.type, event.agent_id, event.node_id, event.session_id,
            event.message_id, _moment(event.created_ms), event.stream_id or None,
            event.traceparent, data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
