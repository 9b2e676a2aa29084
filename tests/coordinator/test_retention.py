"""Retention under load: trimming never removes an entry some group still needs."""

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
from coordinator.retention import trim_stream
from coordinator.signals import Retry
from coordinator.transport import RedisTransport

pytestmark = pytest.mark.anyio

SLOW = DeliveryConfig(concurrency=4, claim_idle_ms=2_000, lease_renew_ms=200,
                      claim_interval_ms=100, block_ms=50, backoff_base_ms=20, backoff_max_ms=50)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def test_trimming_during_slow_consumption_keeps_every_pending_entry(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    total = 120
    handled: Counter[int] = Counter()
    retried: set[int] = set()

    async def handler(d: Delivery) -> None:
        n = codec.decode_payload(d.envelope.payload)  # type: ignore[union-attr]
        handled[n] += 1
        await anyio.sleep(0.005)
        if n % 10 == 0 and n not in retried:
            retried.add(n)  # waits out a backoff while pending: must survive trimming
            raise Retry(0.05)

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, SLOW)
    trims = removed = 0
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await transport.add_many(inbox.stream, [codec.encode(make_envelope("a", i))
                                                for i in range(total)])
        with anyio.fail_after(20):
            while len(handled) < total or consumer.in_flight:
                removed += await trim_stream(transport, inbox.stream, retention_ms=0)
                trims += 1
                pending = await transport.pending(inbox.stream, "a", 10_000)
                for p in pending:
                    rows = await transport.range(inbox.stream, p.id, p.id)
                    assert rows, f"pending entry {p.id!r} was trimmed"
                await anyio.sleep(0.002)
        consumer.stop()
    assert set(handled) == set(range(total))
    assert all(handled[n] == 2 for n in retried) and len(retried) == total // 10
    assert trims > 10 and removed > 0, "trimming never overlapped consumption"
    # Everything acknowledged now: the next trims remove the rest.
    with anyio.fail_after(5):
        while await transport.length(inbox.stream):
            await trim_stream(transport, inbox.stream, retention_ms=0)
            await anyio.sleep(0.01)


async def test_a_lagging_group_holds_back_trimming(transport: RedisTransport,
                                                  keys: Keys) -> None:
    stream = keys.inbox("a").stream
    await transport.ensure_group(stream, "fast")
    await transport.ensure_group(stream, "slow")
    ids = await transport.add_many(stream, [codec.encode(make_envelope("a", i))
                                            for i in range(10)])
    read = await transport.read_group(stream, "fast", "f", 10, None)
    await transport.ack(stream, "fast", [e.id for e in read])
    assert await trim_stream(transport, stream, retention_ms=0) == 0
    read = await transport.read_group(stream, "slow", "s", 6, None)
    await transport.ack(stream, "slow", [e.id for e in read[:4]])  # 5th and 6th stay pending
    await anyio.sleep(0.002)  # the floor by age is "now": let it pass the last id
    assert await trim_stream(transport, stream, retention_ms=0) == 4
    assert [e.id for e in await transport.range(stream, "-", "+")] == ids[4:]
    # With a long retention, nothing that young is trimmed even when acknowledged.
    await transport.ack(stream, "slow", [e.id for e in read[4:]])
    assert await trim_stream(transport, stream, retention_ms=60_000) == 0
