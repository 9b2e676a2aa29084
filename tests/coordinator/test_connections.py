"""The packed commands' own connections: reused while healthy, replaced once they die, and
writes piggybacked on blocking reads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from coordinator.config import RedisConfig
from coordinator.errors import ConnectionLost, GroupMissing, TransportError
from coordinator.transport import AckWrite, AppendWrite, Piggyback, RedisTransport
from coordinator.transport.packed_scripts import LARGE_ENTRY_BYTES, PackedAppender
from coordinator.transport.redis_packed import Connections, read_group

pytestmark = pytest.mark.anyio


async def _kill_clients(url: str) -> None:
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.client_kill_filter(_type="normal", skipme=True)
    finally:
        await admin.aclose()


async def _client_count(url: str, name: str | None = None) -> int:
    """Clients connected (other than the one asking), or only those named ``name``."""
    admin = aioredis.Redis.from_url(url)
    try:
        clients = await admin.client_list(_type="normal")
    finally:
        await admin.aclose()
    if name is None:
        return len(clients) - 1
    return sum(client["name"] == name for client in clients)


@contextlib.asynccontextmanager
async def _own_connections(url: str, limit: int, name: str | None = None
                           ) -> AsyncIterator[tuple[aioredis.Redis, Connections]]:
    """A client, and a set of packed-command connections using its pool's settings."""
    client = aioredis.Redis.from_url(url, client_name=name)
    connections = Connections(client.connection_pool, limit=limit)
    try:
        yield client, connections
    finally:
        await connections.close()
        await client.aclose()


async def test_idle_connections_are_reused_not_reopened(real_transport: RedisTransport,
                                                        real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    await real_transport.ensure_group("conns:s", "g")
    before = await _client_count(url)
    for n in range(100):
        await real_transport.add("conns:s", b"%d" % n)
        entries = await real_transport.read_group("conns:s", "g", "c", 10, None)
        assert await real_transport.ack("conns:s", "g", [e.id for e in entries]) == 1
    assert await _client_count(url) - before <= 1


async def test_a_killed_connection_fails_one_call_at_most(real_transport: RedisTransport,
                                                          real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    await real_transport.ensure_group("conns:k", "g")
    await real_transport.add("conns:k", b"first")
    await _kill_clients(url)
    failures = 0
    for n in range(5):
        try:
            await real_transport.add("conns:k", b"%d" % n)
        except ConnectionLost:
            failures += 1
    assert failures <= 1
    entries = await real_transport.read_group("conns:k", "g", "c", 100, None)
    assert len(entries) == 1 + 5 - failures
    assert await real_transport.ack("conns:k", "g", [e.id for e in entries]) == len(entries)


async def test_a_connection_idle_for_long_is_checked_before_use(
        real_transport: RedisTransport, real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    await real_transport.add("conns:i", b"first")
    await _kill_clients(url)
    await anyio.sleep(1.2)  # idle past the check threshold: the dead socket is noticed
    assert await real_transport.add("conns:i", b"second")


async def test_no_reply_within_the_socket_timeout_fails_the_call_and_not_the_next(
        real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    transport = await RedisTransport.connect(RedisConfig(url=url, socket_timeout_s=0.3))
    admin = aioredis.Redis.from_url(url)
    try:
        await transport.ensure_group("conns:t", "g")
        # A blocking read may outlast the socket timeout by the time it asked to block.
        with anyio.fail_after(5):
            assert await transport.read_group("conns:t", "g", "c", 10, 600) == []
        await admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")
        with pytest.raises(ConnectionLost, match="no reply within 0.3 s"):
            await transport.add("conns:t", b"paused")
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert await transport.add("conns:t", b"after")
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await transport.close()


async def test_callers_over_the_limit_wait_for_a_connection(real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    replies: list[object] = []
    async with _own_connections(url, 1, "conns-limit") as (_, connections):

        async def ping() -> None:
            replies.append(await connections.call(b"*1\r\n$4\r\nPING\r\n"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(ping)
        assert len(replies) == 10 and all(r in (b"PONG", "PONG", True) for r in replies)
        assert await _client_count(url, "conns-limit") == 1


async def test_appends_of_large_and_small_entries_report_each_outcome(
        real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    async with _own_connections(url, 4) as (client, connections):
        appender = PackedAppender(client, connections)
        await client.delete("conns:big", "conns:small", "conns:notastream")
        await client.set("conns:notastream", "x")
        big = b"b" * LARGE_ENTRY_BYTES
        items = [("conns:big", big), ("conns:notastream", big), ("conns:small", b"s1"),
                 ("conns:big", big + b"2"), ("conns:notastream", big), ("conns:small", b"s2")]
        outcomes = await appender.append(items)
        assert [isinstance(o, TransportError) for o in outcomes] == [
            False, True, False, False, True, False]
        assert [fields[b"e"] for _, fields in await client.xrange("conns:big")] == [
            big, big + b"2"]  # one XADD each, in order
        assert [fields[b"e"] for _, fields in await client.xrange("conns:small")] == [
            b"s1", b"s2"]  # one script call
        # The connection is still in step: the next exchange reads its own reply.
        assert await appender.append([("conns:small", b"s3")]) != [b""]
        assert await client.xlen("conns:small") == 3


async def test_appends_load_their_script_again_after_a_flush(real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    async with _own_connections(url, 2) as (client, connections):
        appender = PackedAppender(client, connections)
        await client.delete("conns:flushed")
        await client.script_flush()  # as after a restart of the server
        outcomes = await appender.append([("conns:flushed", b"a"), ("conns:flushed", b"b")])
        assert all(isinstance(o, bytes) for o in outcomes)
        assert [f[b"e"] for _, f in await client.xrange("conns:flushed")] == [b"a", b"b"]


class _Source:
    """A piggyback source handing out its writes once, noting each outcome."""

    def __init__(self, *writes: AckWrite | AppendWrite) -> None:
        self.writes = list(writes)
        self.outcomes: list[BaseException | None] = []

    def __call__(self) -> Piggyback | None:
        return Piggyback(self.writes.pop(0), self.outcomes.append) if self.writes else None


async def test_piggybacked_writes_go_ahead_of_a_blocking_read(real_server: object) -> None:
    # One connection only: the read must find the entry appended in its own write.
    url = real_server.url  # type: ignore[attr-defined]
    async with _own_connections(url, 1) as (client, connections):
        await client.delete("conns:ride", "conns:notastream")
        await client.set("conns:notastream", "x")
        await client.xgroup_create("conns:ride", "g", id="0", mkstream=True)
        first = await client.xadd("conns:ride", {"e": "first"})
        assert await read_group(connections, "conns:ride", "g", "c", 10, None, b">")
        sources = [_Source(AckWrite("conns:ride", "g", [first])),
                   _Source(AppendWrite("conns:notastream", b"x")),
                   _Source(AppendWrite("conns:ride", b"rider"))]
        stops = [connections.piggyback(source) for source in sources]
        with anyio.fail_after(3):
            read = await read_group(connections, "conns:ride", "g", "c", 10, 5000, b">")
        assert [e.fields for e in read] == [{b"e": b"rider"}]
        assert sources[0].outcomes == [None] and sources[2].outcomes == [None]
        assert [type(o) for o in sources[1].outcomes] == [TransportError]
        assert "WRONGTYPE" in str(sources[1].outcomes[0])
        assert (await client.xpending("conns:ride", "g"))["pending"] == 1  # "first" acked
        stops[2]()
        sources[2].writes.append(AppendWrite("conns:ride", b"not polled"))
        assert await read_group(connections, "conns:ride", "g", "c", 10, 10, b">") == []


async def test_riders_of_a_cancelled_read_learn_that_their_writes_landed(
        real_server: object) -> None:
    """A consumer stopping cancels its blocking read, maybe before the riders' replies were
    read: told "failed", a rider whose write was done would write it again."""
    url = real_server.url  # type: ignore[attr-defined]
    async with _own_connections(url, 1) as (client, connections):
        await client.delete("conns:quiet", "conns:rode")
        await client.xgroup_create("conns:quiet", "g", id="0", mkstream=True)
        assert await read_group(connections, "conns:quiet", "g", "c", 10, None, b">") == []
        source = _Source(AppendWrite("conns:rode", b"x"))
        with anyio.CancelScope() as scope:
            def poll() -> Piggyback | None:
                # Cancelled in the next pass of the loop: while the replies are awaited.
                asyncio.get_running_loop().call_soon(scope.cancel)
                return source()

            connections.piggyback(poll)
            await read_group(connections, "conns:quiet", "g", "c", 10, 5000, b">")
        assert scope.cancelled_caught
        assert source.outcomes == [None] and await client.xlen("conns:rode") == 1


async def test_riders_of_a_failed_read_are_told_it_failed(real_server: object) -> None:
    url = real_server.url  # type: ignore[attr-defined]
    transport = await RedisTransport.connect(RedisConfig(url=url, socket_timeout_s=0.3))
    admin = aioredis.Redis.from_url(url)
    source = _Source(AppendWrite("conns:paused", b"x"), AppendWrite("conns:nogroup", b"y"))
    transport.piggyback(source)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")
        with pytest.raises(ConnectionLost, match="no reply within 0.3 s"):
            await transport.read_group("conns:nostream", "g", "c", 10, 100)
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert [type(o) for o in source.outcomes] == [ConnectionLost]
        # The read fails on its own (no group): the rider's write was done all the same.
        with pytest.raises(GroupMissing):
            await transport.read_group("conns:nostream", "g", "c", 10, 100)
        assert source.outcomes[1:] == [None] and await admin.xlen("conns:nogroup") == 1
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await transport.close()
