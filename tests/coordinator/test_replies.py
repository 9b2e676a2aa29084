"""Reply streams expire: every reply refreshes the time to live of the requester's stream, and
a live node keeps its own stream alive, so the stream of a crashed requester goes away."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

from coordinator import codec
from coordinator.agent import Message
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.errors import TransportError
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.replies import REPLY_STREAM_TTL_MS, ReplyRouter
from coordinator.transport import MemoryTransport, RedisTransport

pytestmark = pytest.mark.anyio


class Clock:
    """Wall-clock time that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not await check():  # type: ignore[misc]
            await anyio.sleep(0.02)


async def test_add_expiring_sets_the_time_to_live(transport: RedisTransport,
                                                  keys: Keys) -> None:
    stream = keys.replies("n1")
    await transport.add_expiring(stream, b"one", 60_000)
    assert 0 < await transport.client.pttl(stream) <= 60_000
    await transport.client.pexpire(stream, 1_000)
    await transport.add_expiring(stream, b"two", 60_000)  # refreshed by each entry
    assert 1_000 < await transport.client.pttl(stream) <= 60_000
    assert [e.fields for e in await transport.range(stream, "-", "+")] == [{b"e": b"one"},
                                                                          {b"e": b"two"}]
    assert await transport.expire(stream, 5_000)
    assert 0 < await transport.client.pttl(stream) <= 5_000
    assert not await transport.expire(keys.replies("nobody"), 5_000)


async def test_add_expiring_loads_its_script_again_after_a_flush(transport: RedisTransport,
                                                                  keys: Keys) -> None:
    stream = keys.replies("n1")
    await transport.add_expiring(stream, b"one", 60_000)
    await transport.client.script_flush()  # as after a restart of the server
    await transport.add_expiring(stream, b"two", 60_000)
    assert await transport.length(stream) == 2
    await transport.client.set(keys.replies("n2"), "not a stream")
    with pytest.raises(TransportError, match="WRONGTYPE"):
        await transport.add_expiring(keys.replies("n2"), b"x", 60_000)
    assert await transport.client.pttl(keys.replies("n2")) == -1  # the script stopped at XADD


async def test_add_expiring_in_memory_expires() -> None:
    clock = Clock()
    memory = MemoryTransport(clock=clock)
    await memory.add_expiring("r", b"one", 60_000)
    clock.offset += 50
    await memory.add_expiring("r", b"two", 60_000)
    clock.offset += 50
    assert await memory.length("r") == 2
    clock.offset += 11
    assert await memory.length("r") == 0
    assert not await memory.expire("r", 5_000)


@pytest.fixture(params=["real", "memory"])
def setup(request: pytest.FixtureRequest, prefix: str
          ) -> tuple[CoordinatorConfig, MemoryTransport | None, Clock]:
    clock = Clock()
    memory = MemoryTransport(clock=clock) if request.param == "memory" else None
    url = "redis://unused" if memory else request.getfixturevalue("real_server").url
    config = CoordinatorConfig.from_url(
        url, prefix=prefix, node_id="server",
        delivery=DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=50, grace_ms=500))
    return config, memory, clock


async def test_the_reply_stream_of_a_crashed_requester_expires(
        setup: tuple[CoordinatorConfig, MemoryTransport | None, Clock]) -> None:
    config, memory, clock = setup

    async def echo(message: Message) -> str:
        return f"echo {message.payload}"

    async with MultiAgentCoordinator(config, transport=memory) as server:
        server.register("echo", echo)
        stream = server.keys.replies("ghost")  # no node reads it any more
        request = make_envelope("echo", "hi", reply_to=stream, correlation_id="c1")
        await server.transport.add(server.keys.inbox("echo").stream, codec.encode(request))
        with anyio.fail_after(10):
            while not await server.transport.length(stream):
                await anyio.sleep(0.02)
        if memory is None:
            assert isinstance(server.transport, RedisTransport)
            assert 0 < await server.transport.client.pttl(stream) <= REPLY_STREAM_TTL_MS
    if memory is not None:
        clock.offset += REPLY_STREAM_TTL_MS / 1000 - 5
        assert await memory.length(stream) == 1
        clock.offset += 10
        assert await memory.length(stream) == 0


async def test_a_node_puts_a_time_to_live_on_its_own_reply_stream() -> None:
    clock = Clock()
    memory = MemoryTransport(clock=clock)
    await memory.add("r", b"left over")  # e.g. written before reply streams had a TTL
    router = ReplyRouter(memory, "r", ttl_ms=60_000)
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        await anyio.sleep(0.1)
        assert await memory.length("r") == 0  # read and deleted; the key stays, with a TTL
        clock.offset += 61
        assert await memory.expire("r", 1) is False  # expired: a dead node's stream goes away
        tg.cancel_scope.cancel()


async def test_a_live_node_keeps_its_reply_stream_alive() -> None:
    memory = MemoryTransport()
    await memory.ensure_group("r", "marker")  # an empty stream, seen as long as it exists
    await memory.expire("r", 1_200)
    # Refreshed every 300 ms at most; at least once a second (each read blocks up to 1 s).
    router = ReplyRouter(memory, "r", ttl_ms=1_200)
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        await anyio.sleep(2.5)
        assert [g.name for g in await memory.groups("r")] == ["marker"]
        tg.cancel_scope.cancel()
