"""A consumer never takes back an entry a peer took over: neither when a retry's backoff ends
nor when it hands back unfinished work on stop. On fakeredis, a real server and in memory."""

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
from coordinator.signals import Retry
from coordinator.transport import StreamTransport

pytestmark = pytest.mark.anyio

# Leases and idle claims far beyond the test: only the code under test moves ownership.
CONFIG = DeliveryConfig(concurrency=2, block_ms=50, grace_ms=200, claim_interval_ms=100,
                        claim_idle_ms=60_000, lease_renew_ms=30_000, heartbeat_ttl_ms=60_000)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def owner(transport: StreamTransport, stream: str) -> list[tuple[str, int]]:
    return [(p.consumer, p.deliveries) for p in await transport.pending(stream, "a", 10)]


async def test_a_retry_does_not_take_back_an_entry_a_peer_took_over(
        transport: StreamTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    runs: list[int] = []

    async def handler(d: Delivery) -> None:
        runs.append(d.deliveries)
        raise Retry(delay_s=0.4)

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        entry_id = await transport.add(inbox.stream, codec.encode(make_envelope("a", "x")))
        await wait_for(lambda: runs == [1])
        # During the backoff a peer takes the entry over (as a dead-node claim would).
        assert [e.id for e in await transport.claim(inbox.stream, "a", "c2", 0, [entry_id])] \
            == [entry_id]
        await anyio.sleep(0.8)  # the backoff is over
        assert runs == [1]
        assert await owner(transport, inbox.stream) == [("c2", 2)]
        assert consumer.in_flight == 0
        consumer.stop()
    assert await owner(transport, inbox.stream) == [("c2", 2)]


async def test_hand_back_leaves_an_entry_a_peer_took_over_alone(
        transport: StreamTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    started = anyio.Event()

    async def stuck(d: Delivery) -> None:
        started.set()
        await anyio.sleep_forever()

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), stuck, CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        kept = await transport.add(inbox.stream, codec.encode(make_envelope("a", "kept")))
        with anyio.fail_after(10):
            await started.wait()
        await transport.claim(inbox.stream, "a", "c2", 0, [kept])
        consumer.stop()
    pending = await transport.pending(inbox.stream, "a", 10)
    assert [(p.id, p.consumer) for p in pending] == [(kept, "c2")]
    # Not back-dated either: the peer keeps its lease.
    assert pending[0].idle_ms < 5_000


async def test_transport_claims_and_releases_only_owned_entries(
        transport: StreamTransport, keys: Keys) -> None:
    stream = keys.inbox("a").stream
    await transport.ensure_group(stream, "a")
    ids = [await transport.add(stream, codec.encode(make_envelope("a", i))) for i in range(3)]
    assert len(await transport.read_group(stream, "a", "c1", 10, None)) == 3
    await transport.claim(stream, "a", "c2", 0, [ids[1]])
    await transport.delete_entries(stream, [ids[2]])

    claimed = await transport.claim_owned(stream, "a", "c1", ids)
    assert [e.id for e in claimed] == [ids[0]]
    assert claimed[0].fields is not None and b"e" in claimed[0].fields
    # ids[2] was ours but deleted: acked. ids[1] stays the peer's, its counter untouched.
    assert await owner(transport, stream) == [("c1", 2), ("c2", 2)]

    await transport.release(stream, "a", "c1", ids, 120_000)
    rows = {p.id: p for p in await transport.pending(stream, "a", 10)}
    assert rows[ids[0]].consumer == "c1" and rows[ids[0]].idle_ms >= 120_000
    assert rows[ids[1]].consumer == "c2" and rows[ids[1]].idle_ms < 60_000
    assert await transport.claim_owned(stream, "a", "c1", []) == []
