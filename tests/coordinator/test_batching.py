"""AppendBatcher: concurrent appends share round trips; every caller learns its own outcome."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from coordinator.errors import TransportError
from coordinator.transport.batching import AppendBatcher

pytestmark = pytest.mark.anyio


class FakeWriter:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []
        self.fail_streams: set[str] = set()
        self.gate = anyio.Event()
        self.gate.set()

    async def __call__(self, items: Sequence[tuple[str, bytes]]) -> list[bytes | BaseException]:
        await self.gate.wait()
        await anyio.sleep(0.001)
        self.batches.append(list(items))
        return [TransportError(f"bad {s}") if s in self.fail_streams else b"%s-%d" % (d, i)
                for i, (s, d) in enumerate(items)]


async def test_lone_append_is_written_at_once() -> None:
    writer = FakeWriter()
    batcher = AppendBatcher(writer)
    assert await batcher.append("s", b"x") == b"x-0"
    assert writer.batches == [[("s", b"x")]]


async def test_concurrent_appends_share_round_trips_and_get_their_own_ids() -> None:
    writer = FakeWriter()
    batcher = AppendBatcher(writer)
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await batcher.append("s", str(i).encode())

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert sorted(results) == list(range(200))
    assert all(r.startswith(str(i).encode() + b"-") for i, r in results.items())
    assert len(writer.batches) < 20
    assert sum(len(b) for b in writer.batches) == 200


async def test_an_error_reaches_only_its_caller() -> None:
    writer = FakeWriter()
    writer.fail_streams.add("bad")
    batcher = AppendBatcher(writer)
    outcomes: dict[str, object] = {}

    async def one(stream: str) -> None:
        try:
            outcomes[stream] = await batcher.append(stream, b"x")
        except TransportError as exc:
            outcomes[stream] = exc

    async with anyio.create_task_group() as tg:
        for stream in ("a", "bad", "c"):
            tg.start_soon(one, stream)
    assert isinstance(outcomes["bad"], TransportError)
    assert outcomes["a"] == b"x-0" or isinstance(outcomes["a"], bytes)
    assert isinstance(outcomes["c"], bytes)


async def test_cancelled_callers_never_stall_the_others() -> None:
    writer = FakeWriter()
    writer.gate = anyio.Event()
    batcher = AppendBatcher(writer)
    done: list[int] = []

    async def one(i: int) -> None:
        await batcher.append("s", b"%d" % i)
        done.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
        await anyio.sleep(0.01)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await batcher.append("s", b"cancelled")  # follower cancelled while waiting
        writer.gate.set()
    with anyio.fail_after(2):
        assert await batcher.append("s", b"after") == b"after-0"
    assert sorted(done) == list(range(10))


async def test_concurrent_append_many_callers_share_round_trips_in_order() -> None:
    writer = FakeWriter()
    batcher = AppendBatcher(writer, max_batch=50)
    results: dict[int, list[object]] = {}

    async def many(k: int) -> None:
        results[k] = await batcher.append_many(f"s{k}", [b"%d.%d" % (k, i) for i in range(7)])

    async with anyio.create_task_group() as tg:
        for k in range(30):
            tg.start_soon(many, k)
    for k, ids in results.items():  # each caller gets its own entries' ids, in its order
        assert [bytes(r).rsplit(b"-", 1)[0] for r in ids] == [b"%d.%d" % (k, i) for i in range(7)]
    assert len(writer.batches) < 30  # shared round trips
    assert all(len(b) <= 50 for b in writer.batches[1:])  # one caller's entries never split
    assert sorted(results) == list(range(30))
    assert await batcher.append_many("s", []) == []
