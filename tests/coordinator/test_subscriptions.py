"""Topic subscriptions: every subscribing agent gets every broadcast, dedup window or not.
On a real redis-server and in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

from coordinator.agent import Message
from coordinator.signals import Reject
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.keys import Keys
from coordinator.transport import MemoryTransport

pytestmark = pytest.mark.anyio

Factory = Callable[..., AbstractAsyncContextManager[MultiAgentCoordinator]]


@pytest.fixture(params=["real", "memory"])
def node(request: pytest.FixtureRequest, prefix: str) -> Factory:
    memory = MemoryTransport() if request.param == "memory" else None
    url = "redis://unused" if memory else request.getfixturevalue("real_server").url

    @asynccontextmanager
    async def make(node_id: str, dedup_window_ms: int = 60_000
                   ) -> AsyncIterator[MultiAgentCoordinator]:
        # One slot: the slow subscriber reads each message only after the fast one acked it.
        delivery = DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=50, grace_ms=1000,
                                  concurrency=1, dedup_window_ms=dedup_window_ms,
                                  claim_interval_ms=100)
        config = CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id,
                                            delivery=delivery)
        async with MultiAgentCoordinator(config, transport=memory) as coordinator:
            yield coordinator

    return make


async def test_every_subscriber_gets_every_broadcast_with_dedup_on(node: Factory) -> None:
    fast: list[Any] = []
    slow: list[Any] = []

    async def on_fast(message: Message) -> None:
        fast.append(message.payload)

    async def on_slow(message: Message) -> None:
        await anyio.sleep(0.1)
        slow.append(message.payload)

    async with node("n1") as coordinator:
        coordinator.subscribe("news", on_fast, agent_id="fast")
        coordinator.subscribe("news", on_slow, agent_id="slow")
        await anyio.sleep(0.2)  # both groups exist before the first broadcast
        for i in range(5):
            await coordinator.broadcast("news", i)
        with anyio.fail_after(10):
            while len(fast) < 5 or len(slow) < 5:
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # nothing more arrives
        groups = await coordinator.transport.groups(coordinator.keys.topic("news").stream)
    assert fast == slow == [0, 1, 2, 3, 4]
    assert {g.name: g.pending for g in groups} == {"fast": 0, "slow": 0}


def test_each_subscriber_has_its_own_dedup_window_on_the_topic_slot() -> None:
    keys = Keys("kiki")
    topic = keys.topic("news")
    a, b = keys.subscription("news", "a"), keys.subscription("news", "b")
    assert a.stream == b.stream == topic.stream
    assert a.dead_letters == b.dead_letters == topic.dead_letters
    assert len({a.dedup, b.dedup, topic.dedup}) == 3
    assert all("{t:news}" in key for key in (a.dedup, b.dedup))


async def test_redriving_a_subscribers_dead_letter_reaches_that_subscriber_only(
        node: Factory) -> None:
    picky: list[Any] = []
    easy: list[Any] = []
    refuse = True

    async def on_picky(message: Message) -> None:
        if refuse and message.payload == "odd":
            raise Reject("not today")
        picky.append(message.payload)

    async def on_easy(message: Message) -> None:
        easy.append(message.payload)

    async with node("n1", dedup_window_ms=0) as coordinator:  # no window to hide a repeat
        coordinator.subscribe("news", on_picky, agent_id="picky")
        coordinator.subscribe("news", on_easy, agent_id="easy")
        await anyio.sleep(0.2)
        for payload in ("even", "odd"):
            await coordinator.broadcast("news", payload)
        letters = coordinator.dead_letters("picky", topic="news")
        with anyio.fail_after(10):
            while len(easy) < 2 or await letters.count() < 1:
                await anyio.sleep(0.02)
        assert [d.group for d in await letters.list()] == ["picky"]
        assert await coordinator.dead_letters("easy", topic="news").list() == []
        refuse = False
        assert await letters.redrive() == (1, [])
        with anyio.fail_after(10):
            while len(picky) < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # the other subscriber would have seen it by now
        groups = await coordinator.transport.groups(coordinator.keys.topic("news").stream)
    assert picky == ["even", "odd"]
    assert easy == ["even", "odd"]  # not a second time
    assert {g.name: g.pending for g in groups} == {"picky": 0, "easy": 0}
