"""The seed's EventBus API on Streams: durable subscribers catch up, ephemeral ones tail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from coordinator import EventBus, get_eventbus
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.transport import MemoryTransport

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["real", "memory"])
def bus(request: pytest.FixtureRequest, prefix: str) -> Callable[[str], EventBus]:
    """Builds buses (one per node id) that share one store."""
    memory = MemoryTransport() if request.param == "memory" else None
    url = "redis://unused" if memory else request.getfixturevalue("real_server").url

    def make(node_id: str) -> EventBus:
        config = CoordinatorConfig.from_url(
            url, prefix=prefix, node_id=node_id,
            delivery=DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=100, grace_ms=1000))
        return get_eventbus(config, transport=memory)

    return make


async def wait_for(check: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not check():
            await anyio.sleep(0.02)


async def test_publish_reaches_every_durable_subscriber(bus: Callable[[str], EventBus]) -> None:
    audit: list[Any] = []
    billing: list[Any] = []

    async def on_audit(event: Any) -> None:
        audit.append(event)

    def on_billing(event: Any) -> None:  # plain functions work too
        billing.append(event)

    async with bus("listener") as listener:
        listener.subscribe("orders", on_audit, name="audit")
        listener.subscribe("orders", on_billing, name="billing")
        publisher = bus("publisher")
        try:
            ids = [await publisher.publish("orders", {"order": i}) for i in range(3)]
        finally:
            await publisher.close()
        await wait_for(lambda: len(audit) == 3 and len(billing) == 3)
    assert len(set(ids)) == 3
    assert audit == billing == [{"order": 0}, {"order": 1}, {"order": 2}]


async def test_subscriber_that_was_down_gets_what_it_missed(
        bus: Callable[[str], EventBus]) -> None:
    seen: list[Any] = []

    async def audit(event: Any) -> None:
        seen.append(event)

    async with bus("publisher") as publisher:
        subscriber = bus("sub-1")
        subscriber.subscribe("orders", audit, name="audit")
        await subscriber.start_listener()
        try:
            await publisher.publish("orders", "first")
            await wait_for(lambda: seen == ["first"])
        finally:
            await subscriber.close()
        for event in ("missed-1", "missed-2"):
            await publisher.publish("orders", event)
        async with bus("sub-2") as subscriber:
            subscriber.subscribe("orders", audit, name="audit")
            await wait_for(lambda: len(seen) == 3)
            await anyio.sleep(0.2)
    assert seen == ["first", "missed-1", "missed-2"]  # each once


async def test_ephemeral_subscriber_tails_from_now(bus: Callable[[str], EventBus]) -> None:
    seen: list[Any] = []
    async with bus("publisher") as publisher:
        await publisher.publish("news", "old")
        node = bus("node")
        node.subscribe("news", seen.append, durable=False)
        async with node:  # the tail has its starting point once the listener runs
            await publisher.publish("news", "new")
            await wait_for(lambda: seen == ["new"])
            groups = await node.coordinator.transport.groups(
                node.coordinator.keys.topic("news").stream)
    assert groups == []  # leaves nothing behind


async def test_get_eventbus_is_a_factory_and_respects_enabled(prefix: str) -> None:
    config = CoordinatorConfig.from_url("redis://unused", prefix=prefix, provider="memory")
    first, second = get_eventbus(config), get_eventbus(config)
    assert first is not second
    async with first:
        assert await first.publish("t", 1)
    disabled = get_eventbus(CoordinatorConfig.from_url("redis://unused", enabled=False))
    assert await disabled.publish("t", 1) == ""
    await disabled.start_listener()
    await disabled.close()
