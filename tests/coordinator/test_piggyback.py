"""Acks and lifecycle events handed to a read to carry (piggyback): nothing lost or reordered
when the read's write fails, or while the writer has more to send."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from coordinator.config import DeliveryConfig
from coordinator.delivery import ConsumerStats, Delivery, StreamSpec
from coordinator.envelope import AgentEvent
from coordinator.errors import ConnectionLost
from coordinator.events import EventPublisher, make_event, read_events
from coordinator.keys import Keys
from coordinator.ledger import Ledger
from coordinator.registry import now_ms
from coordinator.transport import AckWrite, AppendWrite, Entry, MemoryTransport, Piggyback
from coordinator.transport.protocol import PiggybackSource

pytestmark = pytest.mark.anyio


class CarryingTransport(MemoryTransport):
    """A memory transport whose "reads" are the test: it polls the sources by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[PiggybackSource] = []

    def piggyback(self, source: PiggybackSource) -> Callable[[], None]:
        self.sources.append(source)
        return lambda: self.sources.remove(source)

    def poll(self) -> list[Piggyback]:
        return [ride for source in self.sources if (ride := source()) is not None]

    async def apply(self, ride: Piggyback) -> None:
        """Do what Redis would with the write, then report success."""
        write = ride.write
        if isinstance(write, AckWrite):
            await self.ack(write.stream, write.group, write.ids)
        else:
            assert isinstance(write, AppendWrite)
            await self.add(write.stream, write.data)
        ride.done(None)


def _event(data: dict[str, object]) -> AgentEvent:
    return make_event("agent:message", "a", "n", None, data)


async def _names(transport: MemoryTransport, stream: str) -> list[str]:
    return [event.data["n"] async for event in read_events(transport, stream, after=b"0-0",
                                                             follow=False)]


@pytest.mark.parametrize("read", ["lands", "fails"])
async def test_events_riding_a_read_stay_ahead_of_later_ones(read: str) -> None:
    transport = CarryingTransport()
    publisher = EventPublisher("ev")
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run, transport)
        publisher.publish_nowait(_event({"n": "first"}))
        [ride] = transport.poll()
        publisher.publish_nowait(_event({"n": "second"}))
        assert transport.poll() == []  # one batch rides at a time
        await anyio.sleep(0.05)  # the writer is awake: it must wait for the batch riding
        assert await _names(transport, "ev") == []
        if read == "lands":
            await transport.apply(ride)
        else:  # the publisher writes the batch itself, still first
            ride.done(ConnectionLost("the read failed"))
        with anyio.fail_after(5):
            while publisher.published < 2:
                await anyio.sleep(0.01)
        assert await _names(transport, "ev") == ["first", "second"]
        assert publisher.failed == 0
        await publisher.close()


async def test_acks_of_a_failed_read_are_sent_by_the_ack_loop() -> None:
    transport = CarryingTransport()
    spec = StreamSpec(Keys("t").inbox("a"), "g", "c")
    await transport.ensure_group(spec.keys.stream, "g")
    for n in range(3):
        await transport.add(spec.keys.stream, b"%d" % n)
    entries = await transport.read_group(spec.keys.stream, "g", "c", 10, None)
    stats = ConsumerStats()
    ledger = Ledger(transport, spec, DeliveryConfig(), stats)
    deliveries = [Delivery(Entry(e.id, e.fields), None, 1, now_ms()) for e in entries]
    for delivery in deliveries:
        ledger.held[delivery.entry.id] = delivery
    async with anyio.create_task_group() as tg:
        tg.start_soon(ledger.ack_loop)
        await anyio.sleep(0.01)  # the ack loop is polled from now on
        ledger.queue_ack(deliveries[0])
        [ride] = transport.poll()
        assert ride.write == AckWrite(spec.keys.stream, "g", [deliveries[0].entry.id])
        await transport.apply(ride)
        assert stats.acked == 1 and deliveries[0].entry.id not in ledger.held
        ledger.queue_ack(deliveries[1])
        ledger.queue_ack(deliveries[2])
        [ride] = transport.poll()
        ride.done(ConnectionLost("the read failed"))
        with anyio.fail_after(5):
            while stats.acked < 3:
                await anyio.sleep(0.01)
        assert ledger.held == {}
        assert (await transport.pending(spec.keys.stream, "g", 10)) == []
        tg.cancel_scope.cancel()

