"""Batched stream appends packed by hand: one EVALSHA of the APPEND script per stream.

For this one fixed command shape, packing the commands here rather than through redis-py's
pipeline, and appending a whole batch per script call, costs the client ~1 us per entry
instead of ~11 us for one XADD each through a pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection

from . import scripts
from .redis_errors import mapped_error, mapped_errors


class PackedAppender:
    """Appends ``(stream, data)`` items over one pooled connection per batch."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._sha = hashlib.sha1(scripts.APPEND.encode()).hexdigest().encode()

    async def append(self, items: Sequence[tuple[str, bytes]]
                             ) -> list[bytes | BaseException]:
        """Append each ``(stream, data)``, all in one write; per item its id or its error.

        Items are grouped by stream into one EVALSHA of the APPEND script each (one key per
        command, so cluster-safe), packed here rather than through redis-py's pipeline: the
        client then pays ~1 us per entry instead of ~11 us for an XADD through a pipeline.
        A script error (wrong type, OOM) fails every item of that stream's group.
        """
        if not items:
            return []
        groups: dict[str, list[int]] = {}
        for index, (stream, _) in enumerate(items):
            groups.setdefault(stream, []).append(index)
        replies: list[bytes | BaseException] = [b""] * len(items)
        missing = await self._groups(items, groups, replies)
        if missing:  # the server lost its script cache (restart, SCRIPT FLUSH): load, redo
            with mapped_errors():
                await self.client.script_load(scripts.APPEND)
            await self._groups(items, {s: groups[s] for s in missing}, replies)
        return replies

    async def _groups(self, items: Sequence[tuple[str, bytes]],
                             groups: dict[str, list[int]],
                             replies: list[bytes | BaseException]) -> list[str]:
        """Run one APPEND per group; fills ``replies``; returns groups that hit NOSCRIPT."""
        parts: list[bytes] = []
        sha = self._sha
        for stream, indexes in groups.items():
            key = stream.encode()
            parts += (b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n$%d\r\n"
                      % (len(indexes) + 4, sha, len(key)), key, b"\r\n")
            for index in indexes:
                data = items[index][1]
                parts += (b"$%d\r\n" % len(data), data, b"\r\n")
        missing: list[str] = []
        pool = self.client.connection_pool
        with mapped_errors():
            get_connection = cast(Callable[[], Awaitable[AbstractConnection]],
                                  pool.get_connection)  # unannotated in redis-py
            conn = await get_connection()
            try:
                await conn.send_packed_command([b"".join(parts)], check_health=False)
                for stream, indexes in groups.items():
                    try:
                        ids = cast("list[bytes]", await conn.read_response())
                    except rex.ResponseError as exc:  # this group failed; read the others
                        if isinstance(exc, rex.NoScriptError):
                            missing.append(stream)
                            continue
                        error = mapped_error(exc)
                        for index in indexes:
                            replies[index] = error
                        continue
                    for index, entry_id in zip(indexes, ids):
                        replies[index] = entry_id
            except BaseException:
                # Replies may be left unread on the socket: never hand it to another caller.
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        return missing
