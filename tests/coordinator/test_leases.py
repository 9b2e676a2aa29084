"""Leases: a long handler keeps its entry; a handler that lost it is told so and its ack is
refused. Timing-sensitive, so on a real server only."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from coordinator import codec
from coordinator.config import DeliveryConfig
from coordinator.consumer import GroupConsumer
from coordinator.delivery import Delivery, StreamSpec
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.transport import RedisTransport

pytestmark = [pytest.mark.anyio, pytest.mark.real_redis]

LEASE = DeliveryConfig(concurrency=4, claim_idle_ms=600, lease_renew_ms=150,
                       claim_interval_ms=100, block_ms=50, grace_ms=2_000)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def test_long_handler_is_never_handed_to_a_second_consumer(
        real_transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    runs: list[str] = []
    done = anyio.Event()

    async def slow(d: Delivery) -> None:
        runs.append("c1")
        await anyio.sleep(3 * LEASE.claim_idle_ms / 1000)
        done.set()

    async def must_not_run(d: Delivery) -> None:
        runs.append("c2")

    c1 = GroupConsumer(real_transport, StreamSpec(inbox, "a", "c1"), slow, LEASE)
    c2 = GroupConsumer(real_transport, StreamSpec(inbox, "a", "c2"), must_not_run, LEASE)
    async with anyio.create_task_group() as tg:
        await tg.start(c1.run)
        await real_transport.add(inbox.stream, codec.encode(make_envelope("a", "long")))
        await wait_for(lambda: runs)
        await tg.start(c2.run)
        with anyio.fail_after(10):
            await done.wait()
        await wait_for(lambda: c1.stats.acked == 1)
        c1.stop()
        c2.stop()
    assert runs == ["c1"]
    assert c1.stats.leases_renewed >= 3 and c1.stats.leases_lost == 0
    assert c2.stats.delivered == 0 and c2.stats.reclaimed == 0
    assert (await real_transport.groups(inbox.stream))[0].pending == 0


async def test_lost_lease_is_reported_and_the_late_ack_refused(
        real_transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    # Nobody claims idle entries during the test: the thief keeps what it took.
    config = DeliveryConfig(concurrency=4, claim_idle_ms=30_000, lease_renew_ms=150,
                            claim_interval_ms=100, block_ms=50)
    started = anyio.Event()
    seen_lost: list[bool] = []

    async def handler(d: Delivery) -> None:
        started.set()
        await wait_for(lambda: d.lost)
        seen_lost.append(d.lost)

    consumer = GroupConsumer(real_transport, StreamSpec(inbox, "a", "c1"), handler, config)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        entry_id = await real_transport.add(inbox.stream,
                                            codec.encode(make_envelope("a", "x")))
        with anyio.fail_after(5):
            await started.wait()
        await real_transport.claim(inbox.stream, "a", "thief", 0, [entry_id])
        await wait_for(lambda: seen_lost and consumer.in_flight == 0)
        # Give a late ack every chance to go out before looking.
        await anyio.sleep(0.3)
        consumer.stop()
    assert seen_lost == [True]
    assert consumer.stats.leases_lost == 1 and consumer.stats.acked == 0
    [pending] = await real_transport.pending(inbox.stream, "a", 10)
    assert pending.id == entry_id and pending.consumer == "thief"


async def test_ack_after_an_unnoticed_takeover_is_refused(
        real_transport: RedisTransport, keys: Keys) -> None:
    """The entry is taken between two renewals and the handler finishes before the next one:
    the ack checks ownership (the entry was held past the safe-ack time) and is refused."""
    inbox = keys.inbox("a")
    config = DeliveryConfig(concurrency=4, claim_idle_ms=30_000, lease_renew_ms=10_000,
                            heartbeat_ttl_ms=200, claim_interval_ms=100, block_ms=50)
    started = anyio.Event()
    stolen = anyio.Event()
    deliveries: list[Delivery] = []

    async def handler(d: Delivery) -> None:
        deliveries.append(d)
        started.set()
        await stolen.wait()

    consumer = GroupConsumer(real_transport, StreamSpec(inbox, "a", "c1"), handler, config)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        entry_id = await real_transport.add(inbox.stream,
                                            codec.encode(make_envelope("a", "x")))
        with anyio.fail_after(5):
            await started.wait()
        await anyio.sleep(0.2)  # past the safe-ack time (heartbeat_ttl_ms / 2)
        await real_transport.claim(inbox.stream, "a", "thief", 0, [entry_id])
        stolen.set()
        await wait_for(lambda: consumer.stats.refused_acks == 1)
        consumer.stop()
    assert deliveries[0].lost
    assert consumer.stats.acked == 0 and consumer.stats.leases_lost == 1
    [pending] = await real_transport.pending(inbox.stream, "a", 10)
    assert pending.consumer == "thief"
