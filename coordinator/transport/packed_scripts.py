"""Scripted writes packed by hand over :class:`~.redis_packed.Connections`: batched stream
appends (one EVALSHA of the APPEND script per stream, or an XADD per large entry) and calls of
every other Lua script.

Appending a whole batch per script call costs the client ~1 us per entry instead of ~11 us for
one XADD each through redis-py's pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex

from . import scripts
from .redis_errors import mapped_error, mapped_errors
from .redis_packed import Connections, pack_command, unless_error

#: Entries this large are appended with an XADD each rather than by the APPEND script.
LARGE_ENTRY_BYTES = 2048


class PackedScript:
    """A Lua script called by a hand-packed EVALSHA over :class:`Connections`, loaded again
    when the server lost it (restart, SCRIPT FLUSH).

    redis-py's script call goes through its command layer, pool and retry wrapper: one after
    another, a call cost 120-129 us of CPU that way against 61-69 us here, round trip
    included. It was most of an answering node's time when every message is a request.
    """

    def __init__(self, client: aioredis.Redis, connections: Connections, source: str) -> None:
        self._client = client
        self._connections = connections
        self._source = source
        #: What EVALSHA names the script by.
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()

    async def __call__(self, keys: Sequence[str], args: Sequence[bytes | str | int]) -> Any:
        """The script's reply.

        :raises TransportError: mapped from the Redis error (a script error included)
        """
        packed = pack_command(["EVALSHA", self.sha, len(keys), *keys, *args])
        reply = (await self._connections.exchange(packed))[0]
        if isinstance(reply, rex.NoScriptError):
            await self.load()
            reply = (await self._connections.exchange(packed))[0]
        return unless_error(reply)

    async def load(self) -> None:
        """Load the script into the server's cache (after a NOSCRIPT reply).

        :raises TransportError: mapped from the Redis error
        """
        with mapped_errors():
            await self._client.script_load(self._source)


class PackedAppender:
    """Appends ``(stream, data)`` items over one connection per batch.

    :param client: loads the script when the server lost it
    """

    def __init__(self, client: aioredis.Redis, connections: Connections) -> None:
        self._connections = connections
        # Called here several times in one write, not through the script's own call.
        self._script = PackedScript(client, connections, scripts.APPEND)

    async def append(self, items: Sequence[tuple[str, bytes]]
                             ) -> list[bytes | BaseException]:
        """Append each ``(stream, data)``, all in one write; per item its id or its error.

        Items are grouped by stream into one EVALSHA of the APPEND script each (one key per
        command, so cluster-safe; a plain XADD for a lone item), packed here rather than
        through redis-py's pipeline: the client then pays ~1 us per entry instead of ~11 us
        for an XADD through a pipeline.
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
            await self._script.load()
            await self._groups(items, {s: groups[s] for s in missing}, replies)
        return replies

    async def _groups(self, items: Sequence[tuple[str, bytes]],
                             groups: dict[str, list[int]],
                             replies: list[bytes | BaseException]) -> list[str]:
        """Run one APPEND per group; fills ``replies``; returns groups that hit NOSCRIPT."""
        parts: list[bytes] = []
        sha = self._script.sha
        one_each = {stream for stream, indexes in groups.items()
                    if len(indexes) == 1 or _large(items, indexes)}
        for stream, indexes in groups.items():
            key = stream.encode()
            if stream in one_each:
                # A lone entry: a plain XADD spares Redis the script call. Large entries: the
                # script costs Redis more (8 KB: ~12 us an entry, copying them into Lua and
                # back) than reading a reply each costs us.
                for index in indexes:
                    parts.append(pack_command(["XADD", key, "*", "e", items[index][1]]))
                continue
            parts += (b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n$%d\r\n"
                      % (len(indexes) + 4, sha, len(key)), key, b"\r\n")
            for index in indexes:
                data = items[index][1]
                parts += (b"$%d\r\n" % len(data), data, b"\r\n")
        count = sum(len(groups[stream]) if stream in one_each else 1 for stream in groups)
        replies_in_order = iter(await self._connections.exchange(b"".join(parts), count))
        missing: list[str] = []
        for stream, indexes in groups.items():
            if stream in one_each:  # a reply per entry
                for index in indexes:
                    reply = next(replies_in_order)
                    replies[index] = (mapped_error(reply) if isinstance(reply, rex.ResponseError)
                                      else reply)
                continue
            reply = next(replies_in_order)
            if isinstance(reply, rex.NoScriptError):
                missing.append(stream)
            elif isinstance(reply, rex.ResponseError):  # this group failed
                error = mapped_error(reply)
                for index in indexes:
                    replies[index] = error
            else:
                for index, entry_id in zip(indexes, reply):
                    replies[index] = entry_id
        return missing


def _large(items: Sequence[tuple[str, bytes]], indexes: list[int]) -> bool:
    """Whether a stream's entries are large enough, on average, to append one XADD each."""
    return sum(len(items[i][1]) for i in indexes) >= LARGE_ENTRY_BYTES * len(indexes)
