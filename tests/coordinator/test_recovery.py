"""Recovery: a restarted consumer re-reads its own pending entries first; consumption carries
on across FLUSHALL and across a Redis restart without dying or spinning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from coordinator import codec
from coordinator.config import DeliveryConfig
from coordinator.consumer import GroupConsumer
from coordinator.delivery import Delivery, StreamSpec
from coordinator.errors import ConnectionLost
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.registry import Registry
from coordinator.transport import RedisTransport

pytestmark = pytest.mark.anyio

FAST = DeliveryConfig(concurrency=8, claim_idle_ms=1_000, lease_renew_ms=100,
                      heartbeat_ttl_ms=1_000, claim_interval_ms=50, block_ms=50, grace_ms=1_000)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


def payload_of(d: Delivery) -> Any:
    return codec.decode_payload(d.envelope.payload)  # type: ignore[union-attr]


class Counting:
    """Passes every call through to a transport and counts the calls of each method."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


async def assert_not_spinning(counting: Counting, transport: RedisTransport) -> None:
    """An idle consumer waits in blocking reads (fakeredis cannot block: the suite's fake
    transport waits 5 ms instead), and its other loops run on their intervals."""
    wait_s = 0.005 if type(transport).__name__ == "FakeRedisTransport" else FAST.block_ms / 1000
    before = dict(counting.calls)
    await anyio.sleep(0.5)
    reads = counting.calls.get("read_group", 0) - before.get("read_group", 0)
    others = sum(counting.calls.values()) - sum(before.values()) - reads
    assert reads <= 0.5 / wait_s * 1.5 + 2
    assert others <= 0.5 / (FAST.claim_interval_ms / 1000) * 4


async def test_restart_under_the_same_name_rereads_own_pending_entries_first(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    await transport.ensure_group(inbox.stream, "a")
    old = await transport.add_many(inbox.stream, [codec.encode(make_envelope("a", f"old-{i}"))
                                                  for i in range(5)])
    # A previous incarnation of c1 read these and died before acking them.
    assert len(await transport.read_group(inbox.stream, "a", "c1", 5, None)) == 5
    await transport.delete_entries(inbox.stream, [old[2]])  # deleted while pending
    await transport.add_many(inbox.stream, [codec.encode(make_envelope("a", f"new-{i}"))
                                            for i in range(3)])
    handled: list[tuple[str, int]] = []

    async def handler(d: Delivery) -> None:
        handled.append((payload_of(d), d.deliveries))

    config = DeliveryConfig(concurrency=1, claim_idle_ms=30_000, lease_renew_ms=100,
                            claim_interval_ms=50, block_ms=50)
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, config)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: len(handled) == 7 and consumer.in_flight == 0)
        consumer.stop()
    assert handled == [("old-0", 2), ("old-1", 2), ("old-3", 2), ("old-4", 2),
                       ("new-0", 1), ("new-1", 1), ("new-2", 1)]
    # The deleted entry is cleaned up, not mistaken for poison.
    assert consumer.stats.poison == 0 and await transport.length(inbox.dead_letters) == 0
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_consumption_continues_across_flushall(transport: RedisTransport,
                                                     keys: Keys) -> None:
    inbox = keys.inbox("a")
    seen: set[int] = set()
    sent: list[int] = []
    flushed_at: list[int] = []  # the first message sent after each flush returned
    producing = True

    async def handler(d: Delivery) -> None:
        seen.add(payload_of(d))

    async def produce() -> None:
        n = 0
        while producing:
            await transport.add(inbox.stream, codec.encode(make_envelope("a", n)))
            sent.append(n)
            n += 1
            await anyio.sleep(0.002)

    counting = Counting(transport)
    registry = Registry(transport, keys, ttl_ms=FAST.heartbeat_ttl_ms)
    consumer = GroupConsumer(counting, StreamSpec(inbox, "a", "c1"), handler,  # type: ignore[arg-type]
                             FAST, alive=registry.alive)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        tg.start_soon(produce)
        for _ in range(3):
            # Recovered from the previous flush: the first 100 messages sent after it arrived.
            start = flushed_at[-1] if flushed_at else 0
            await wait_for(lambda: set(range(start, start + 100)) <= seen)
            await transport.client.flushall()
            # A send in flight during the flush may land on either side of it.
            flushed_at.append(len(sent) + 1)
        await wait_for(lambda: len(sent) > flushed_at[-1] + 100)
        producing = False
        last = len(sent)
        # Everything sent after the last flush arrived...
        await wait_for(lambda: set(range(flushed_at[-1], last)) <= seen)
        # ...and an idle consumer waits in blocking reads rather than spinning.
        await wait_for(lambda: consumer.in_flight == 0)
        await assert_not_spinning(counting, transport)
        consumer.stop()
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_consumer_survives_its_stream_being_deleted_again_and_again(
        transport: RedisTransport, keys: Keys) -> None:
    """Every part of the consumer (reader, claimer looking for dead nodes, lease renewal,
    acks) meets the missing stream sooner or later; none of them may take the consumer down."""
    inbox = keys.inbox("a")
    seen: set[int] = set()

    async def handler(d: Delivery) -> None:
        seen.add(payload_of(d))
        await anyio.sleep(0.05)

    registry = Registry(transport, keys, ttl_ms=FAST.heartbeat_ttl_ms)
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST,
                             alive=registry.alive)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        for round in range(20):
            await transport.add(inbox.stream, codec.encode(make_envelope("a", -1)))
            await anyio.sleep(0.005 + 0.004 * round)
            await transport.delete_keys(inbox.stream)
        await anyio.sleep(0.1)
        await transport.add_many(inbox.stream, [codec.encode(make_envelope("a", i))
                                                for i in range(20)])
        await wait_for(lambda: set(range(20)) <= seen)
        consumer.stop()


@pytest.mark.real_redis
async def test_consumption_continues_across_a_redis_restart(
        real_transport: RedisTransport, real_server: Any, keys: Keys) -> None:
    inbox = keys.inbox("a")
    seen: set[int] = set()
    sent: list[int] = []
    producing = True
    send_failures = 0

    async def handler(d: Delivery) -> None:
        seen.add(payload_of(d))
        await anyio.sleep(0.01)

    async def produce() -> None:
        nonlocal send_failures
        n = 0
        while producing:
            try:
                await real_transport.add(inbox.stream, codec.encode(make_envelope("a", n)))
            except ConnectionLost:
                send_failures += 1
                await anyio.sleep(0.05)
                continue
            sent.append(n)
            n += 1
            await anyio.sleep(0.002)

    counting = Counting(real_transport)
    registry = Registry(real_transport, keys, ttl_ms=FAST.heartbeat_ttl_ms)
    consumer = GroupConsumer(counting, StreamSpec(inbox, "a", "c1"), handler,  # type: ignore[arg-type]
                             FAST, alive=registry.alive)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        tg.start_soon(produce)
        restarted_at = 0
        for _ in range(2):
            # Consuming again since the last restart: 100 messages sent after it arrived.
            await wait_for(lambda: set(range(restarted_at, restarted_at + 100)) <= seen,
                           timeout_s=15)
            await anyio.to_thread.run_sync(real_server.restart)
            restarted_at = len(sent)
        await wait_for(lambda: set(range(restarted_at, restarted_at + 100)) <= seen,
                       timeout_s=15)
        producing = False
        # With appendonly every acknowledged send survives the restart: nothing is missing.
        await wait_for(lambda: set(sent) <= seen, timeout_s=15)
        # A read whose reply was lost in the restart leaves entries pending that the consumer
        # does not know of; its idle claimer brings them back after claim_idle_ms.
        with anyio.fail_after(FAST.claim_idle_ms / 1000 + 5):
            while consumer.in_flight or (await real_transport.groups(inbox.stream))[0].pending:
                await anyio.sleep(0.05)
        await assert_not_spinning(counting, real_transport)
        consumer.stop()
    assert send_failures > 0, "the restart was not noticed"
