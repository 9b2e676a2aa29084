"""The coordinator's own lifecycle: stopping under cancellation, failures of its parts, and
Redis refusing writes for a while."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from coordinator import CoordinatorConfig, DeliveryConfig, MultiAgentCoordinator
from coordinator.errors import TransportError

pytestmark = [pytest.mark.anyio, pytest.mark.real_redis]

FAST = DeliveryConfig(heartbeat_ttl_ms=600, block_ms=50, grace_ms=500, claim_interval_ms=100)


def config(url: str, prefix: str, node_id: str) -> CoordinatorConfig:
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id, delivery=FAST)


async def test_outer_cancellation_still_hands_back_and_exits_cleanly(
        real_server: Any, prefix: str) -> None:
    started = anyio.Event()

    async def slow(message: Any) -> None:
        started.set()
        await anyio.sleep(30)

    async with MultiAgentCoordinator(config(real_server.url, prefix, "client")) as client:
        with anyio.move_on_after(1.0):
            async with MultiAgentCoordinator(config(real_server.url, prefix, "n1")) as node:
                node.register("slow", slow)
                await client.send("slow", {})
                await started.wait()
                await anyio.sleep(30)  # cancelled by the outer scope while the handler runs
        inbox = client.keys.inbox("slow").stream
        pending = await client.transport.pending(inbox, "slow", 10)
        # Handed back: still pending (for a peer), back-dated far past the claim threshold.
        assert len(pending) == 1 and pending[0].idle_ms >= FAST.claim_idle_ms
        assert "n1" not in {n.node_id for n in await client.nodes()}


async def test_a_crashed_part_surfaces_its_own_error(real_server: Any, prefix: str) -> None:
    class Boom(RuntimeError):
        pass

    coordinator = MultiAgentCoordinator(config(real_server.url, prefix, "n1"))

    async def explode() -> None:
        raise Boom("a background part failed")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with coordinator:
            assert coordinator._tg is not None
            coordinator._tg.start_soon(explode)
            await anyio.sleep(5)
    assert caught.group_contains(Boom)


async def test_redis_refusing_writes_for_a_while_does_not_kill_the_node(
        real_server: Any, prefix: str) -> None:
    handled: list[int] = []

    async def count(message: Any) -> None:
        handled.append(message.payload)

    node = MultiAgentCoordinator(config(real_server.url, prefix, "n1"))
    node.register("count", count)
    async with node:
        await node.send("count", 1)
        client = node.transport.client  # type: ignore[attr-defined]
        await client.config_set("maxmemory", "1")  # every write now fails with OOM
        try:
            await anyio.sleep(FAST.heartbeat_interval_ms * 3 / 1000)  # beats fail meanwhile
            with pytest.raises(TransportError):
                await node.send("count", 2)
        finally:
            await client.config_set("maxmemory", "0")
        await node.send("count", 3)
        with anyio.fail_after(10):
            while 3 not in handled:
                await anyio.sleep(0.02)
    assert 1 in handled and 3 in handled


async def test_only_coordinators_serving_agents_are_nodes(real_server: Any, prefix: str) -> None:
    async def echo(message: Any) -> Any:
        return message.payload

    async with MultiAgentCoordinator(config(real_server.url, prefix, "client")) as client:
        await client.send("echo", 1)  # a pure client: sends, serves nothing
        assert await client.nodes() == []
        async with MultiAgentCoordinator(config(real_server.url, prefix, "n1")) as node:
            node.register("echo", echo)
            with anyio.fail_after(5):
                while [n.node_id for n in await client.nodes()] != ["n1"]:
                    await anyio.sleep(0.02)
            assert await client.request("echo", 2, timeout=5) == 2
