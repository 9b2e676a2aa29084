"""The idle-claim backstop: XAUTOCLAIM from a kept cursor, and entries deleted while pending.

Runs on fakeredis and on a real server (run the suite with KIKI_REDIS_SERVER pointing at a 6.2
binary to cover the 6.2 reply shape, where deleted entries come back as nil)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import pytest

from coordinator import codec
from coordinator.claimer import Claimer
from coordinator.config import DeliveryConfig
from coordinator.consumer import GroupConsumer
from coordinator.delivery import Delivery, StreamSpec
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.registry import Registry
from coordinator.transport import Entry, RedisTransport

pytestmark = pytest.mark.anyio

IDLE_MS = 300
CONFIG = DeliveryConfig(concurrency=8, claim_idle_ms=IDLE_MS, lease_renew_ms=100,
                        claim_interval_ms=50, block_ms=50)


async def wait_for(check: Callable[[], object], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.01)


async def idle_past(transport: RedisTransport, stream: str, group: str, ms: int) -> None:
    """Wait until every pending entry of the group is idle longer than ``ms``."""
    with anyio.fail_after(10):
        while True:
            rows = await transport.pending(stream, group, 10_000)
            if all(p.idle_ms > ms for p in rows):
                return
            await anyio.sleep(0.05)


async def pending_for(transport: RedisTransport, stream: str, group: str,
                      consumer: str, count: int) -> list[bytes]:
    """Add ``count`` messages (payloads 0..count-1) and leave them pending for ``consumer``."""
    await transport.ensure_group(stream, group)
    ids = await transport.add_many(stream, [codec.encode(make_envelope("a", i))
                                            for i in range(count)])
    read = await transport.read_group(stream, group, consumer, count, None)
    assert len(read) == count
    return ids


class Sink:
    """A claim sink with a fixed number of free slots that records what it is given;
    ``roomy=False``: its handlers never finish (no room for a next batch)."""

    def __init__(self, free: int, roomy: bool = True) -> None:
        self.free = free
        self.roomy = roomy
        self.accepted: list[Entry] = []

    def reserve(self, wanted: int, priority: bool = False) -> int:
        return min(wanted, self.free)

    def unreserve(self, n: int) -> None:
        pass

    def holds(self, entry_id: bytes) -> bool:
        return any(e.id == entry_id for e in self.accepted)

    async def accept(self, entries: list[Entry], counts: dict[bytes, int] | None) -> None:
        self.accepted += entries

    async def wait_for_room(self) -> None:
        if not self.roomy:
            await anyio.sleep_forever()


async def nobody_alive(names: Sequence[str]) -> list[bool]:
    return [False] * len(names)


DEAD_CONFIG = DeliveryConfig(concurrency=8, claim_idle_ms=30_000, heartbeat_ttl_ms=1_000,
                             claim_interval_ms=200, block_ms=50)


async def test_a_dead_consumers_entries_are_taken_batch_after_batch_in_one_round(
        transport: RedisTransport, keys: Keys) -> None:
    """A dead node may hold far more than one batch: the next batch is taken as soon as there
    is room, not a round later, and the consumer is removed once drained."""
    inbox = keys.inbox("a")
    ids = await pending_for(transport, inbox.stream, "a", "ghost", 50)
    await idle_past(transport, inbox.stream, "a", DEAD_CONFIG.heartbeat_ttl_ms // 2)
    sink = Sink(free=8)
    claimer = Claimer(transport, StreamSpec(inbox, "a", "c1"), DEAD_CONFIG, sink, nobody_alive)
    assert await claimer.reclaim_dead() == 50
    assert [e.id for e in sink.accepted] == ids
    assert "ghost" not in {c.name for c in await transport.consumers(inbox.stream, "a")}


async def test_a_full_sink_takes_one_batch_of_a_dead_consumer_per_round(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    ids = await pending_for(transport, inbox.stream, "a", "ghost", 20)
    await idle_past(transport, inbox.stream, "a", DEAD_CONFIG.heartbeat_ttl_ms // 2)
    sink = Sink(free=8, roomy=False)
    claimer = Claimer(transport, StreamSpec(inbox, "a", "c1"), DEAD_CONFIG, sink, nobody_alive)
    with anyio.fail_after(5):  # gives up waiting for room after one round (200 ms)
        assert await claimer.reclaim_dead() == 8
    assert [e.id for e in sink.accepted] == ids[:8]
    ghost = {c.name: c.pending for c in await transport.consumers(inbox.stream, "a")}["ghost"]
    assert ghost == 12


async def test_idle_claim_resumes_from_its_cursor_and_acks_deleted_entries(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    ids = await pending_for(transport, inbox.stream, "a", "ghost", 60)
    await idle_past(transport, inbox.stream, "a", IDLE_MS)
    # The first 50 are busy elsewhere (fresh, so not claimable): a scan that restarted at 0-0
    # every round would spend its attempts on them and never reach the idle ones behind.
    await transport.claim(inbox.stream, "a", "busy", 0, ids[:50])
    idle, deleted = ids[50:], [ids[51], ids[55], ids[59]]
    await transport.delete_entries(inbox.stream, deleted)

    sink = Sink(free=2)
    claimer = Claimer(transport, StreamSpec(inbox, "a", "c1"), CONFIG, sink, None)
    for _ in range(40):
        await claimer.claim_idle()
        if len(sink.accepted) == len(idle) - len(deleted):
            break
    assert sorted(e.id for e in sink.accepted) == sorted(set(idle) - set(deleted))
    assert all(e.fields for e in sink.accepted)
    rows = await transport.pending(inbox.stream, "a", 100)
    owners = {p.id: p.consumer for p in rows}
    assert not set(deleted) & set(owners), "deleted entries must be acked"
    assert {owners[i] for i in set(idle) - set(deleted)} == {"c1"}
    assert {owners[i] for i in ids[:50]} == {"busy"}


async def test_consumer_takes_over_idle_entries_of_a_silent_consumer(
        transport: RedisTransport, keys: Keys) -> None:
    """Without a registry only the idle backstop finds "ghost"'s entries."""
    inbox = keys.inbox("a")
    ids = await pending_for(transport, inbox.stream, "a", "ghost", 20)
    await transport.delete_entries(inbox.stream, ids[3:6])
    handled: list[int] = []

    async def handler(d: Delivery) -> None:
        handled.append(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: len(handled) == 17 and consumer.in_flight == 0)
        await wait_until_nothing_pending(transport, inbox.stream)
        consumer.stop()
    assert sorted(handled) == [i for i in range(20) if i not in (3, 4, 5)]
    assert consumer.stats.reclaimed == 17 and consumer.stats.poison == 0
    assert await transport.length(inbox.dead_letters) == 0


async def test_entries_of_a_consumer_missing_from_the_registry_are_taken_at_once(
        transport: RedisTransport, keys: Keys) -> None:
    """A consumer without a heartbeat is dead: its entries are taken without waiting for the
    idle threshold (30 s here), deleted ones are cleaned up, and the consumer is removed."""
    inbox = keys.inbox("a")
    ids = await pending_for(transport, inbox.stream, "a", "ghost", 20)
    await transport.delete_entries(inbox.stream, ids[3:6])
    registry = Registry(transport, keys, ttl_ms=1_000)
    config = DeliveryConfig(concurrency=8, claim_idle_ms=30_000, heartbeat_ttl_ms=1_000,
                            lease_renew_ms=100, claim_interval_ms=50, block_ms=50)
    handled: list[int] = []

    async def handler(d: Delivery) -> None:
        handled.append(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    await idle_past(transport, inbox.stream, "a", config.heartbeat_ttl_ms // 2)
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, config,
                             alive=registry.alive)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: len(handled) == 17 and consumer.in_flight == 0)
        await wait_until_nothing_pending(transport, inbox.stream)
        consumer.stop()
    assert sorted(handled) == [i for i in range(20) if i not in (3, 4, 5)]
    assert consumer.stats.reclaimed == 17 and consumer.stats.poison == 0
    assert "ghost" not in {c.name for c in await transport.consumers(inbox.stream, "a")}


async def wait_until_nothing_pending(transport: RedisTransport, stream: str) -> None:
    with anyio.fail_after(10):
        while (await transport.groups(stream))[0].pending:
            await anyio.sleep(0.05)
