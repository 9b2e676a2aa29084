"""Group consumer behaviour, on fakeredis and on a real redis-server."""

from __future__ import annotations

from collections import Counter

import anyio
import msgspec
import pytest

from coordinator import codec
from coordinator.config import DeliveryConfig
from coordinator.consumer import GroupConsumer
from coordinator.deadletter import DeadLetters
from coordinator.delivery import Delivery, StreamSpec
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.transport import RedisTransport

pytestmark = pytest.mark.anyio

FAST = DeliveryConfig(concurrency=16, max_deliveries=3, backoff_base_ms=5, backoff_max_ms=20,
                      claim_idle_ms=2_000, lease_renew_ms=200, claim_interval_ms=100,
                      block_ms=50, grace_ms=2_000)


async def send(transport: RedisTransport, stream: str, payloads: list[object]) -> None:
    await transport.add_many(stream, [codec.encode(make_envelope("a", p)) for p in payloads])


async def test_every_message_is_handled_and_acked(transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    seen: Counter[int] = Counter()
    done = anyio.Event()

    async def handler(d: Delivery) -> None:
        seen[codec.decode_payload(d.envelope.payload)] += 1  # type: ignore[union-attr]
        if len(seen) == 500:
            done.set()

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(transport, inbox.stream, list(range(500)))
        with anyio.fail_after(15):
            await done.wait()
            while consumer.in_flight:
                await anyio.sleep(0.01)
        consumer.stop()
    assert set(seen) == set(range(500))
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_handlers_that_wait_run_concurrency_at_once_and_no_more(
        transport: RedisTransport, keys: Keys) -> None:
    # Workers take turns to read: while some wait in handlers another keeps reading, and the
    # spare worker kept for reading never runs a handler beyond the limit.
    inbox = keys.inbox("a")
    config = msgspec.structs.replace(FAST, concurrency=4)
    running, most, handled = 0, 0, 0
    others_running: dict[int, int] = {}  # payload -> handlers running when it started

    async def handler(d: Delivery) -> None:
        nonlocal running, most, handled
        others_running[codec.decode_payload(d.envelope.payload)] = running  # type: ignore[union-attr]
        running += 1
        most = max(most, running)
        await anyio.sleep(0.1)
        running -= 1
        handled += 1

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, config)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        for i in range(12):  # one by one: each read finds a lone entry
            await send(transport, inbox.stream, [i])
            await anyio.sleep(0.01)
        await send(transport, inbox.stream, list(range(12, 24)))  # and then a batch
        with anyio.fail_after(15):
            while handled < 24 or consumer.in_flight:
                await anyio.sleep(0.01)
        consumer.stop()
    assert others_running[1] == 1  # read and started while the first one waited
    assert most == 4


async def test_failures_are_retried_then_dead_lettered_with_metadata(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    attempts: Counter[str] = Counter()

    async def handler(d: Delivery) -> None:
        payload = codec.decode_payload(d.envelope.payload)  # type: ignore[union-attr]
        attempts[payload] += 1
        if payload == "flaky" and d.deliveries < 2:
            raise RuntimeError("transient")
        if payload == "broken":
            raise ValueError("always broken")

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(transport, inbox.stream, ["ok", "flaky", "broken"])
        with anyio.fail_after(15):
            while await transport.length(inbox.dead_letters) < 1 or consumer.in_flight:
                await anyio.sleep(0.02)
        consumer.stop()
    assert attempts == {"ok": 1, "flaky": 2, "broken": 3}
    [dead] = await DeadLetters(transport, inbox).list()
    assert dead.reason == "max_deliveries"
    assert dead.error_type == "ValueError" and dead.error == "always broken"
    assert dead.deliveries == 3 and dead.consumer == "c1"
    assert "always broken" in dead.traceback
    assert dead.envelope is not None and dead.failed_ms > 0
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_garbage_is_dead_lettered_and_good_entries_around_it_are_handled(
        transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    handled: list[int] = []

    async def handler(d: Delivery) -> None:
        handled.append(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    good = codec.encode(make_envelope("a", 1))
    garbage = [
        {b"e": b"\xff\x00random bytes\x13"},                 # not msgpack at all
        {b"wrong": good},                                    # right bytes, wrong field
        {b"e": good[: len(good) // 2]},                      # truncated msgpack
        {b"e": msgspec.msgpack.encode({"kind": "msg"})},     # valid msgpack, not an envelope
        {b"e": b"\xc4" + b"x" * 10},                         # bad bin header
        {b"e": b"\x00" * (10 * 1024 * 1024)},                # a 10 MB value
    ]
    await send(transport, inbox.stream, [0])
    for fields in garbage:
        await transport.client.xadd(inbox.stream, fields)
        await send(transport, inbox.stream, [len(handled) + 100])
    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(20):
            while await transport.length(inbox.dead_letters) < len(garbage) \
                    or len(handled) < len(garbage) + 1 or consumer.in_flight:
                await anyio.sleep(0.02)
        consumer.stop()
    assert len(handled) == len(garbage) + 1
    dead = await DeadLetters(transport, inbox).list()
    assert {d.reason for d in dead} == {"poison"}
    assert max(d.raw_size for d in dead) == 10 * 1024 * 1024
    assert (await transport.groups(inbox.stream))[0].pending == 0


async def test_redrive_puts_dead_letters_back(transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    healed = anyio.Event()
    broken = True

    async def handler(d: Delivery) -> None:
        if broken:
            raise RuntimeError("down")
        healed.set()

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(transport, inbox.stream, ["x"])
        letters = DeadLetters(transport, inbox)
        with anyio.fail_after(10):
            while await letters.count() < 1:
                await anyio.sleep(0.02)
        broken = False
        moved, skipped = await letters.redrive()
        assert (moved, skipped) == (1, [])
        with anyio.fail_after(10):
            await healed.wait()
        assert await letters.count() == 0
        consumer.stop()


async def test_group_recreated_after_flushall(transport: RedisTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    seen: set[int] = set()

    async def handler(d: Delivery) -> None:
        seen.add(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    consumer = GroupConsumer(transport, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(transport, inbox.stream, [1, 2, 3])
        with anyio.fail_after(10):
            while len(seen) < 3:
                await anyio.sleep(0.02)
        await transport.client.flushall()
        await send(transport, inbox.stream, [4, 5])
        with anyio.fail_after(10):
            while len(seen) < 5:
                await anyio.sleep(0.02)
        consumer.stop()
    assert seen == {1, 2, 3, 4, 5}
