"""MemoryTransport: Redis Streams semantics checked directly, then the engine running on it.

Expected values (ids, cursors, counters) are what redis-server 7 answers to the same commands.
"""

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
from coordinator.envelope import NodeInfo
from coordinator.errors import GroupMissing, TransportError
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.registry import Registry
from coordinator.retention import trim_stream
from coordinator.transport import MemoryTransport

pytestmark = pytest.mark.anyio

FAST = DeliveryConfig(concurrency=16, max_deliveries=3, backoff_base_ms=5, backoff_max_ms=20,
                      claim_idle_ms=2_000, lease_renew_ms=200, claim_interval_ms=100,
                      block_ms=50, grace_ms=2_000)


class Clock:
    """A clock tests move by hand (seconds, like time.time)."""

    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mem(clock: Clock) -> MemoryTransport:
    return MemoryTransport(clock)


async def read(t: MemoryTransport, consumer: str, count: int = 10,
               history_after: bytes | None = None) -> list[bytes]:
    return [e.id for e in await t.read_group("s", "g", consumer, count, None, history_after)]


async def pel(t: MemoryTransport) -> list[tuple[bytes, str, int, int]]:
    return [tuple(p) for p in await t.pending("s", "g", 100)]  # type: ignore[misc]


# -- ids and plain stream commands ------------------------------------------------------------
async def test_ids_are_monotonic_like_redis(mem: MemoryTransport, clock: Clock) -> None:
    assert await mem.add_many("s", [b"a", b"b"]) == [b"1000-0", b"1000-1"]
    clock.advance(5)
    assert await mem.add("s", b"c") == b"1005-0"
    clock.advance(-100)  # the clock went back: the id still grows
    assert await mem.add("s", b"d") == b"1005-1"
    [entry] = await mem.range("s", b"1005-1", b"+")
    assert entry.fields == {b"e": b"d"}
    assert mem.version == (7, 2, 0) and await mem.length("s") == 4


async def test_range_bounds_reverse_delete_and_trim(mem: MemoryTransport, clock: Clock) -> None:
    for _ in range(5):
        await mem.add("s", b"x")
        clock.advance(1)
    ids = [e.id for e in await mem.range("s", "-", "+")]
    assert ids == [b"1000-0", b"1001-0", b"1002-0", b"1003-0", b"1004-0"]
    assert [e.id for e in await mem.range("s", b"(1001-0", "+", count=2)] == ids[2:4]
    assert [e.id for e in await mem.range("s", "1001", "(1003-0")] == ids[1:3]
    assert [e.id for e in await mem.range("s", "-", "+", count=2, reverse=True)] == ids[:2:-1][:2]
    assert await mem.delete_entries("s", [ids[1], b"9-9"]) == 1
    assert await mem.trim_min_id("s", ids[3]) == 2  # 1000-0 and 1002-0 (1001-0 was deleted)
    assert [e.id for e in await mem.range("s", "-", "+")] == ids[3:]
    assert await mem.range("missing", "-", "+") == [] and await mem.trim_min_id("nope", b"5") == 0
    with pytest.raises(TransportError):
        await mem.range("s", "not-an-id", "+")


# -- consumer groups --------------------------------------------------------------------------
async def test_read_group_fills_the_pel_and_history_reads_count_again(
        mem: MemoryTransport, clock: Clock) -> None:
    await mem.ensure_group("s", "g")
    await mem.ensure_group("s", "g")  # an existing group is kept
    ids = await mem.add_many("s", [b"1", b"2", b"3"])
    assert await read(mem, "c1", 2) == ids[:2]
    assert await read(mem, "c2") == ids[2:]
    assert await read(mem, "c2") == []
    clock.advance(30)
    assert await pel(mem) == [(ids[0], "c1", 30, 1), (ids[1], "c1", 30, 1), (ids[2], "c2", 30, 1)]
    # History: strictly after the id, own entries only, counter + 1 and idle reset (as Redis).
    assert await read(mem, "c1", 10, ids[0]) == ids[1:2]
    assert await pel(mem) == [(ids[0], "c1", 30, 1), (ids[1], "c1", 0, 2), (ids[2], "c2", 30, 1)]
    # A deleted pending entry comes back with no fields and its counter untouched.
    await mem.delete_entries("s", [ids[0]])
    history = await mem.read_group("s", "g", "c1", 10, None, b"0-0")
    assert [(e.id, e.fields) for e in history] == [(ids[0], None), (ids[1], {b"e": b"2"})]
    assert (await pel(mem))[:2] == [(ids[0], "c1", 30, 1), (ids[1], "c1", 0, 3)]
    [group] = await mem.groups("s")
    assert group == ("g", 2, 3, ids[2], 0)
    await mem.add("s", b"4")
    assert (await mem.groups("s"))[0].lag == 1
    assert [(c.name, c.pending) for c in await mem.consumers("s", "g")] == [("c1", 2), ("c2", 1)]


async def test_claim_min_idle_counter_owner_and_deleted_entries(
        mem: MemoryTransport, clock: Clock) -> None:
    await mem.ensure_group("s", "g")
    ids = await mem.add_many("s", [b"1", b"2", b"3"])
    await read(mem, "c1")
    clock.advance(100)
    assert await mem.claim("s", "g", "c2", 500, ids) == []  # not idle long enough
    assert [c.name for c in await mem.consumers("s", "g")] == ["c1"]  # nothing claimed: no c2
    await mem.delete_entries("s", [ids[2]])
    claimed = await mem.claim("s", "g", "c2", 50, [ids[0], b"99-0"])
    assert [(e.id, e.fields) for e in claimed] == [(ids[0], {b"e": b"1"})]
    # ids[2] was only looked at by the next claim, which drops it from the PEL (Redis 7).
    assert await mem.claim("s", "g", "c2", 0, [ids[2]]) == []
    assert await pel(mem) == [(ids[0], "c2", 0, 2), (ids[1], "c1", 100, 1)]
    # release: back-dated, same owner, counter unchanged (XCLAIM IDLE ... JUSTID).
    await mem.release("s", "g", "c2", [ids[0]], 7_000)
    assert (await pel(mem))[0] == (ids[0], "c2", 0, 2)  # before time began: Redis uses now
    clock.advance(10_000)
    await mem.release("s", "g", "c2", [ids[0]], 7_000)
    assert (await pel(mem))[0] == (ids[0], "c2", 7_000, 2)


async def test_autoclaim_cursor_count_and_deleted_ids(mem: MemoryTransport) -> None:
    await mem.ensure_group("s", "g")
    ids = await mem.add_many("s", [b"1", b"2", b"3", b"4"])  # 1000-0 .. 1000-3
    await read(mem, "c1", 3)
    await mem.delete_entries("s", [ids[1]])
    first = await mem.claim_idle("s", "g", "c2", 0, b"0-0", 1)
    assert (first.cursor, [e.id for e in first.entries], first.deleted) == (ids[1], [ids[0]], [])
    second = await mem.claim_idle("s", "g", "c2", 0, first.cursor, 1)
    assert (second.cursor, second.entries, second.deleted) == (ids[2], [], [ids[1]])
    third = await mem.claim_idle("s", "g", "c2", 0, b"0-0", 5)
    assert (third.cursor, [e.id for e in third.entries]) == (b"0-0", [ids[0], ids[2]])
    assert await pel(mem) == [(ids[0], "c2", 0, 3), (ids[2], "c2", 0, 2)]


async def test_autoclaim_skips_young_entries_and_bounds_its_scan(
        mem: MemoryTransport, clock: Clock) -> None:
    await mem.ensure_group("s", "g")
    ids = await mem.add_many("s", [b"x"] * 25)
    await read(mem, "c1", 25)
    clock.advance(1_000)
    await mem.renew("s", "g", "c1", ids[:24])  # all but the last are young again
    batch = await mem.claim_idle("s", "g", "c2", 500, b"0-0", 2)
    assert batch.entries == [] and batch.cursor == ids[20]  # gave up after 2 * 10 examined
    batch = await mem.claim_idle("s", "g", "c2", 500, batch.cursor, 2)
    assert [e.id for e in batch.entries] == [ids[24]] and batch.cursor == b"0-0"


async def test_renew_ack_checked_and_dedup_window(mem: MemoryTransport, clock: Clock) -> None:
    await mem.ensure_group("s", "g")
    ids = await mem.add_many("s", [b"1", b"2", b"3"])
    await read(mem, "c1")
    await mem.claim("s", "g", "c2", 0, [ids[1]])
    clock.advance(300)
    assert await mem.renew("s", "g", "c1", ids) == [ids[1]]
    assert [p.idle_ms for p in await mem.pending("s", "g", 10, "c1")] == [0, 0]
    refused = await mem.ack_checked("s", "d", "g", "c1", [(ids[0], "m0"), (ids[1], "m1")],
                                    True, 1_000, 5_000)
    assert refused == [ids[1]]
    assert await mem.dedup_seen("d", ["m0", "m1"], 5_000) == [True, False]
    assert await mem.dedup_seen("d", ["m0"], 6_000) == [False]  # window over
    # Unchecked acks do not look at the owner; the window is pruned on every ack.
    assert await mem.ack_checked("s", "d", "g", "c1", [(ids[1], "m1")], False, 1_000, 6_500) == []
    assert await mem.index_members("d") == [("m1", 7_500)]
    assert await mem.ack("s", "g", [ids[2], ids[2]]) == 1
    assert await mem.pending("s", "g", 10) == []


async def test_dead_letter_only_by_the_owner_and_atomic_with_the_ack(
        mem: MemoryTransport) -> None:
    await mem.ensure_group("s", "g")
    [entry_id] = await mem.add_many("s", [b"1"])
    await read(mem, "c1")
    assert await mem.dead_letter("s", "dead", "g", "c2", entry_id, {"reason": "x"}) is None
    dead_id = await mem.dead_letter("s", "dead", "g", "c1", entry_id,
                                    {"reason": "poison", "source_id": entry_id})
    assert dead_id is not None and await mem.pending("s", "g", 10) == []
    [row] = await mem.range("dead", "-", "+")
    assert row.fields == {b"reason": b"poison", b"source_id": entry_id}
    new_id = await mem.move_back("dead", "s", dead_id, b"again")
    assert await mem.length("dead") == 0
    assert [(e.id, e.fields) for e in await mem.range("s", new_id, new_id)] == \
        [(new_id, {b"e": b"again"})]


async def test_delete_idle_consumer_only_without_pending(mem: MemoryTransport) -> None:
    await mem.ensure_group("s", "g")
    await mem.add("s", b"1")
    await read(mem, "c1")
    await read(mem, "c2")
    assert await mem.delete_idle_consumer("s", "g", "c1") is False
    assert await mem.delete_idle_consumer("s", "g", "c2") is True
    assert await mem.delete_idle_consumer("s", "g", "never-seen") is True
    assert [c.name for c in await mem.consumers("s", "g")] == ["c1"]


async def test_missing_group_errors_where_redis_says_nogroup(mem: MemoryTransport) -> None:
    await mem.add("s", b"1")
    for stream in ("s", "missing"):
        with pytest.raises(GroupMissing):
            await mem.read_group(stream, "g", "c", 1, None)
        with pytest.raises(GroupMissing):
            await mem.read_group(stream, "g", "c", 1, None, b"0-0")
        for call in (mem.pending(stream, "g", 1), mem.claim(stream, "g", "c", 0, [b"1-0"]),
                     mem.claim_idle(stream, "g", "c", 0, b"0-0", 1),
                     mem.renew(stream, "g", "c", [b"1-0"]),
                     mem.dead_letter(stream, "dl", "g", "c", b"1-0", {}),
                     mem.delete_idle_consumer(stream, "g", "c"),
                     mem.ack_checked(stream, "d", "g", "c", [(b"1-0", "m")], True, 0, 0)):
            with pytest.raises(GroupMissing):
                await call
        assert await mem.ack(stream, "g", [b"1-0"]) == 0  # XACK answers 0, no error
        assert await mem.renew(stream, "g", "c", []) == []  # the script never reaches XPENDING
    with pytest.raises(GroupMissing):
        await mem.consumers("s", "g")
    with pytest.raises(TransportError) as info:  # XINFO CONSUMERS: "no such key", not NOGROUP
        await mem.consumers("missing", "g")
    assert not isinstance(info.value, GroupMissing)
    assert await mem.groups("missing") == []


# -- plain keys -------------------------------------------------------------------------------
async def test_ttl_keys_index_sets_and_delete(mem: MemoryTransport, clock: Clock) -> None:
    await mem.put_ttl("k1", b"v1", 100)
    await mem.put_ttl("k2", b"v2", 300)
    assert await mem.get_many(["k1", "k2", "k3"]) == [b"v1", b"v2", None]
    clock.advance(100)
    assert await mem.get_many(["k1"]) == [b"v1"]  # expires strictly after its TTL
    clock.advance(1)
    assert await mem.get_many(["k1", "k2"]) == [None, b"v2"]
    await mem.index_add("z", "b", 2)
    await mem.index_add("z", "a", 2)
    await mem.index_add("z", "c", 1)
    assert await mem.index_members("z") == [("c", 1), ("a", 2), ("b", 2)]
    await mem.index_remove("z", "a", "nope")
    await mem.set_add("set", "y", "x", "y")
    assert await mem.set_members("set") == ["x", "y"]
    await mem.ensure_group("s", "g")
    with pytest.raises(TransportError, match="WRONGTYPE"):
        await mem.get_many(["s"])
    assert await mem.delete_keys("k1", "k2", "z", "set", "s", "none") == 4
    assert await mem.length("s") == 0 and await mem.groups("s") == []
    mem.add_fields("s", {b"odd": b"1"})
    mem.flushall()
    assert await mem.length("s") == 0
    await mem.ping()


async def test_instances_share_nothing() -> None:
    a, b = MemoryTransport(), MemoryTransport()
    await a.add("s", b"1")
    assert await b.length("s") == 0


async def test_registry_heartbeat_expires_with_the_clock(mem: MemoryTransport,
                                                         clock: Clock) -> None:
    registry = Registry(mem, Keys("t"), ttl_ms=1_000)
    await registry.beat(NodeInfo(node_id="n1", host="h", pid=1, agents=["a"], started_ms=1,
                                 beat_ms=clock.ms))
    assert await registry.alive(["n1", "n2"]) == [True, False]
    assert [n.node_id for n in await registry.nodes()] == ["n1"]
    clock.advance(1_001)
    assert await registry.alive(["n1"]) == [False]


# -- blocking ---------------------------------------------------------------------------------
async def test_blocking_reads_wake_on_add_and_time_out(mem: MemoryTransport) -> None:
    await mem.ensure_group("s", "g")
    got: dict[str, list[bytes]] = {}

    async def group_reader() -> None:
        got["group"] = [e.id for e in await mem.read_group("s", "g", "c", 10, 10_000)]

    async def plain_reader() -> None:
        got["plain"] = [e.id for e in await mem.read("s", b"$", 10, 0)]  # 0: forever

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(group_reader)
            tg.start_soon(plain_reader)
            await anyio.wait_all_tasks_blocked()
            new_id = await mem.add("s", b"1")
    assert got == {"group": [new_id], "plain": [new_id]}
    start = anyio.current_time()
    assert await mem.read_group("s", "g", "c", 10, 50) == []
    assert await mem.read("s", b"$", 10, 50) == []
    assert anyio.current_time() - start >= 0.09


@pytest.mark.parametrize("how", ["flushall", "delete", "delete_and_recreate"])
async def test_blocked_group_read_fails_when_the_stream_goes(mem: MemoryTransport,
                                                             how: str) -> None:
    await mem.ensure_group("s", "g")

    async def reader() -> None:
        with pytest.raises(GroupMissing):
            await mem.read_group("s", "g", "c", 10, 10_000)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            if how == "flushall":
                mem.flushall()
            else:
                await mem.delete_keys("s")
            if how == "delete_and_recreate":  # before the reader runs again: still an error
                await mem.ensure_group("s", "g")


# -- the engine on the memory transport -------------------------------------------------------
async def send(t: MemoryTransport, stream: str, payloads: list[object]) -> None:
    await t.add_many(stream, [codec.encode(make_envelope("a", p)) for p in payloads])


async def test_engine_dead_letters_garbage_entries(mem: MemoryTransport, keys: Keys) -> None:
    inbox = keys.inbox("a")
    handled: list[int] = []

    async def handler(d: Delivery) -> None:
        handled.append(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    good = codec.encode(make_envelope("a", 1))
    garbage = [{b"e": b"\xff\x00random bytes\x13"}, {b"wrong": good},
               {b"e": good[: len(good) // 2]}, {b"e": msgspec.msgpack.encode({"kind": "msg"})},
               {b"e": b"\x00" * (10 * 1024 * 1024)}]
    await send(mem, inbox.stream, [0])
    for fields in garbage:
        mem.add_fields(inbox.stream, fields)
        await send(mem, inbox.stream, [len(handled) + 100])
    consumer = GroupConsumer(mem, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(10):
            while await mem.length(inbox.dead_letters) < len(garbage) \
                    or len(handled) < len(garbage) + 1 or consumer.in_flight:
                await anyio.sleep(0.01)
        consumer.stop()
    dead = await DeadLetters(mem, inbox).list()
    assert {d.reason for d in dead} == {"poison"}
    assert max(d.raw_size for d in dead) == 10 * 1024 * 1024
    assert (await mem.groups(inbox.stream))[0].pending == 0


async def test_engine_recreates_the_group_after_flushall(mem: MemoryTransport,
                                                         keys: Keys) -> None:
    inbox = keys.inbox("a")
    seen: set[int] = set()

    async def handler(d: Delivery) -> None:
        seen.add(codec.decode_payload(d.envelope.payload))  # type: ignore[union-attr]

    consumer = GroupConsumer(mem, StreamSpec(inbox, "a", "c1"), handler, FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await send(mem, inbox.stream, [1, 2, 3])
        with anyio.fail_after(5):
            while len(seen) < 3:
                await anyio.sleep(0.01)
        mem.flushall()
        await send(mem, inbox.stream, [4, 5])
        with anyio.fail_after(5):
            while len(seen) < 5:
                await anyio.sleep(0.01)
        consumer.stop()
    assert seen == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("dead_node_known", [False, True])
async def test_engine_takes_over_a_silent_consumer(mem: MemoryTransport, clock: Clock,
                                                   keys: Keys, dead_node_known: bool) -> None:
    """Idle claiming (XAUTOCLAIM) or, with heartbeats, the dead node's takeover and removal."""
    inbox = keys.inbox("a")
    deliveries: Counter[int] = Counter()
    done = anyio.Event()

    async def handler(d: Delivery) -> None:
        deliveries[d.deliveries] += 1
        if sum(deliveries.values()) == 3:
            done.set()

    async def alive(nodes: object) -> list[bool]:
        return [False for _ in nodes]  # type: ignore[attr-defined]

    await mem.ensure_group(inbox.stream, "a")
    await send(mem, inbox.stream, [1, 2, 3])
    await mem.read_group(inbox.stream, "a", "dead", 10, None)
    clock.advance(FAST.claim_idle_ms + 1 if not dead_node_known else FAST.heartbeat_ttl_ms)
    consumer = GroupConsumer(mem, StreamSpec(inbox, "a", "c1"), handler, FAST,
                             alive if dead_node_known else None)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(5):
            await done.wait()
            while consumer.in_flight:
                await anyio.sleep(0.01)
        consumer.stop()
    assert deliveries == {2: 3}
    assert (await mem.groups(inbox.stream))[0].pending == 0
    names = [c.name for c in await mem.consumers(inbox.stream, "a")]
    assert names == ([] if dead_node_known else ["dead"])  # c1 left on stop, empty-handed


async def test_retention_trims_only_what_every_group_acked(mem: MemoryTransport,
                                                           clock: Clock) -> None:
    await mem.ensure_group("s", "g")
    ids = []
    for _ in range(4):
        ids.append(await mem.add("s", b"x"))
        clock.advance(10)
    await read(mem, "c", 3)
    await mem.ack("s", "g", ids[:2])
    assert await trim_stream(mem, "s", retention_ms=0, now=clock.ms) == 2
    assert [e.id for e in await mem.range("s", "-", "+")] == ids[2:]
