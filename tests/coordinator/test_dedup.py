"""Duplicate suppression (DESIGN §3.9), on fakeredis and on a real redis-server."""

from __future__ import annotations

from collections import Counter
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

pytestmark = pytest.mark.anyio

DEDUP = DeliveryConfig(concurrency=8, dedup_window_ms=60_000, claim_idle_ms=2_000,
                       lease_renew_ms=200, claim_interval_ms=100, block_ms=50)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def send(transport: RedisTransport, stream: str, message_id: str, payload: object
               ) -> bytes:
    return await transport.add(stream, codec.encode(make_envelope("a", payload, id=message_id)))


async def test_a_message_sent_twice_is_handled_once(transport: RedisTransport,
                                                    keys: Keys) -> None:
    inbox = keys.inbox("a")
    handled: Counter[str] = Counter()

    async def handler(d: Delivery) -> None:
        handled[d.envelope.id] += 1  # type: ignore[union-attr]

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, DEDUP)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(transport, inbox.stream, "m1", 1)
        await wait_for(lambda: consumer.stats.acked == 1)
        # Sent again after the first was handled and acked.
        await send(transport, inbox.stream, "m1", 1)
        await send(transport, inbox.stream, "m2", 2)
        await wait_for(lambda: handled["m2"] == 1 and consumer.stats.acked == 3)
        consumer.stop()
    assert handled == {"m1": 1, "m2": 1}
    assert consumer.stats.duplicates == 1
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_copies_arriving_together_are_handled_once(transport: RedisTransport,
                                                         keys: Keys) -> None:
    """Copies read in one batch, or while the first copy still runs, never run twice."""
    inbox = keys.inbox("a")
    handled: Counter[str] = Counter()
    release = anyio.Event()

    async def handler(d: Delivery) -> None:
        handled[d.envelope.id] += 1  # type: ignore[union-attr]
        await release.wait()

    # Everything is queued before the consumer starts, so the copies share one read.
    for _ in range(3):
        await send(transport, inbox.stream, "same", "x")
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, DEDUP)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: handled["same"] == 1 and consumer.stats.duplicates == 2)
        # Another copy while the first is still running.
        await send(transport, inbox.stream, "same", "x")
        await wait_for(lambda: consumer.stats.duplicates == 3)
        release.set()
        await wait_for(lambda: consumer.stats.acked == 4 and consumer.in_flight == 0)
        consumer.stop()
    assert handled == {"same": 1}
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_a_redelivered_message_already_handled_is_acked_without_running(
        transport: RedisTransport, keys: Keys) -> None:
    """The handler completed and the id was recorded, but the entry is still pending (as if the
    node died between the two): the next consumer acks it without running the handler."""
    inbox = keys.inbox("a")
    runs: list[str] = []

    async def handler(d: Delivery) -> None:
        runs.append(d.envelope.id)  # type: ignore[union-attr]

    await transport.ensure_group(inbox.stream, "a")
    await send(transport, inbox.stream, "done-before", 1)
    await transport.read_group(inbox.stream, "a", "c1", 10, None)
    await transport.client.zadd(inbox.dedup, {"done-before": 2**52})
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, DEDUP)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: consumer.stats.acked == 1)
        consumer.stop()
    assert runs == [] and consumer.stats.duplicates == 1
    assert (await transport.groups(inbox.stream))[0].pending == 0
