"""Lifecycle events: emitted by serving agents, read back (tail, replay, filters), consumed by
durable groups; the publisher never stalls handlers. On a real redis-server and in memory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

from coordinator import AgentEvent, AgentEventType, Reject, codec
from coordinator.agent import Context, Message
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.envelope import EventBatch, PackedEvent
from coordinator.events import EventPublisher, after_id, make_event
from coordinator.producer import make_envelope
from coordinator.transport import MemoryTransport

pytestmark = pytest.mark.anyio

STARTED, COMPLETED, FAILED, MESSAGE = (AgentEventType.STARTED, AgentEventType.COMPLETED,
                                       AgentEventType.FAILED, AgentEventType.MESSAGE)
Factory = Callable[..., AbstractAsyncContextManager[MultiAgentCoordinator]]


def make_config(url: str, prefix: str, node_id: str, **overrides: Any) -> CoordinatorConfig:
    delivery = DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=100, grace_ms=1000,
                              max_deliveries=overrides.pop("max_deliveries", 3),
                              backoff_base_ms=5, backoff_max_ms=20, claim_interval_ms=100)
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id, delivery=delivery,
                                      **overrides)


@pytest.fixture(params=["real", "memory"])
def node(request: pytest.FixtureRequest, prefix: str) -> Factory:
    """Builds coordinators that share one store (a real server, or one memory transport)."""
    memory = MemoryTransport() if request.param == "memory" else None
    url = "redis://unused" if memory else request.getfixturevalue("real_server").url

    @asynccontextmanager
    async def make(node_id: str, **kwargs: Any) -> AsyncIterator[MultiAgentCoordinator]:
        publisher = kwargs.pop("event_publisher", None)
        config = make_config(url, prefix, node_id, **kwargs)
        async with MultiAgentCoordinator(config, transport=memory,
                                         event_publisher=publisher) as coordinator:
            yield coordinator

    return make


async def collect(coordinator: MultiAgentCoordinator, done: Callable[[list[AgentEvent]], bool],
                  timeout: float = 10, **filters: Any) -> list[AgentEvent]:
    """Follow events from the start until ``done(events)``."""
    found: list[AgentEvent] = []
    with anyio.fail_after(timeout):
        async for event in coordinator.events(since="0", **filters):
            found.append(event)
            if done(found):
                return found
    raise AssertionError("event stream ended")


def of(events: Sequence[AgentEvent], message_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, e.data) for e in events if e.message_id == message_id]


async def test_success_emits_started_then_completed(node: Factory) -> None:
    async with node("n1") as coordinator:
        async def worker(message: Message) -> str:
            return f"done {message.payload}"

        coordinator.register("worker", worker)
        assert await coordinator.request("worker", "x", timeout=5, session_id="s1") == "done x"
        events = await collect(coordinator, lambda es: any(e.type == COMPLETED for e in es))
    started, completed = events
    assert [started.type, completed.type] == [STARTED, COMPLETED]
    for event in events:
        assert event.agent_id == "worker" and event.node_id == "n1"
        assert event.session_id == "s1" and event.message_id == started.message_id
        assert event.stream_id
    assert started.data == {"deliveries": 1}
    assert completed.data["reply_bytes"] > 0 and completed.data["duration_ms"] >= 0


async def test_a_subscribers_events_name_the_topic(node: Factory) -> None:
    async with node("n1") as coordinator:
        async def on_news(message: Message) -> None:
            return None

        coordinator.subscribe("news", on_news, agent_id="reader")
        await anyio.sleep(0.2)  # the subscription's group exists before the broadcast
        await coordinator.broadcast("news", {"headline": "x"})
        events = await collect(coordinator, lambda es: any(e.type == COMPLETED for e in es))
    started, completed = events
    assert started.agent_id == "reader" and started.data == {"deliveries": 1, "topic": "news"}
    assert completed.data["topic"] == "news" and completed.data["deliveries"] == 1


async def test_failure_then_retry_then_success(node: Factory) -> None:
    async with node("n1") as coordinator:
        async def flaky(message: Message) -> None:
            if message.deliveries < 2:
                raise RuntimeError("transient")

        coordinator.register("flaky", flaky)
        sent = await coordinator.send("flaky", 1)
        events = await collect(coordinator, lambda es: any(e.type == COMPLETED for e in es))
    steps = of(events, sent)
    assert [t for t, _ in steps] == [STARTED, FAILED, STARTED, COMPLETED]
    failed = steps[1][1]
    assert failed["error_type"] == "RuntimeError" and failed["error"] == "transient"
    assert failed["will_retry"] is True and failed["dead_lettered"] is False
    assert failed["deliveries"] == 1 and steps[2][1]["deliveries"] == 2


async def test_exhausted_and_rejected_messages_are_dead_lettered(node: Factory) -> None:
    async with node("n1", max_deliveries=2) as coordinator:
        async def broken(message: Message) -> None:
            if message.payload == "reject":
                raise Reject("not for me")
            raise ValueError("always")

        coordinator.register("broken", broken)
        exhausted = await coordinator.send("broken", "fail")
        rejected = await coordinator.send("broken", "reject")
        events = await collect(coordinator, lambda es: sum(
            1 for e in es if e.type == FAILED and e.data["dead_lettered"]) == 2)
        with anyio.fail_after(5):
            while await coordinator.transport.length(coordinator.keys.inbox("broken")
                                                     .dead_letters) < 2:
                await anyio.sleep(0.02)
    failures = [d for t, d in of(events, exhausted) if t == FAILED]
    assert [(f["will_retry"], f["dead_lettered"]) for f in failures] == [(True, False),
                                                                       (False, True)]
    [reject] = [d for t, d in of(events, rejected) if t == FAILED]
    assert reject["error_type"] == "Reject" and reject["dead_lettered"] is True
    assert reject["will_retry"] is False


async def test_context_send_emits_agent_message_and_custom_events(node: Factory) -> None:
    async with node("n1") as coordinator:
        received: list[str] = []

        async def first(message: Message, context: Context) -> None:
            context.emit(AgentEventType.TOOL_CALL, {"tool": "search", "input": "q"})
            await context.send("second", "hello")

        async def second(message: Message) -> None:
            received.append(message.id)

        coordinator.register("first", first)
        coordinator.register("second", second)
        sent = await coordinator.send("first", "go", session_id="chat")
        events = await collect(coordinator, lambda es: sum(
            1 for e in es if e.type == COMPLETED) == 2)
    mine = of(events, sent)
    assert [t for t, _ in mine] == [STARTED, "agent:tool_call", MESSAGE, COMPLETED]
    assert mine[1][1] == {"tool": "search", "input": "q"}
    message = mine[2][1]
    assert message["via"] == "send" and message["target"] == "second"
    assert message["sent_id"] == received[0]
    # the second agent's events belong to the same session, about the message it got
    assert {(e.type, e.agent_id, e.session_id) for e in events if e.message_id == received[0]} \
        == {(STARTED, "second", "chat"), (COMPLETED, "second", "chat")}


async def test_replay_resume_and_filters(node: Factory) -> None:
    async with node("n1") as coordinator:
        async def echo(message: Message) -> None:
            pass

        coordinator.register("echo", echo)
        for session in ("a", "b", "a"):
            await coordinator.send("echo", session, session_id=session)
        await collect(coordinator, lambda es: sum(1 for e in es if e.type == COMPLETED) == 3)
        everything = [e async for e in coordinator.events(since="0", follow=False)]
        assert len(everything) == 6
        only_a = [e async for e in coordinator.events(since="0", follow=False, session_id="a")]
        assert len(only_a) == 4 and {e.session_id for e in only_a} == {"a"}
        completed = [e async for e in coordinator.events(since="0", follow=False,
                                                         types=[COMPLETED], agent_id="echo")]
        assert len(completed) == 3
        resumed = [e async for e in coordinator.events(since=everything[3].stream_id,
                                                       follow=False)]
        assert resumed == everything[4:]
        assert [e async for e in coordinator.events(since="2999-01-01T00:00:00Z",
                                                    follow=False)] == []
        assert [e async for e in coordinator.events(follow=False)] == []  # only new ones


async def test_follow_sees_new_events_only(node: Factory) -> None:
    async with node("n1") as coordinator:
        async def echo(message: Message) -> None:
            pass

        coordinator.register("echo", echo)
        await coordinator.send("echo", "before")
        await collect(coordinator, lambda es: any(e.type == COMPLETED for e in es))
        found: list[AgentEvent] = []
        async with anyio.create_task_group() as tg:
            async def follow(*, task_status: Any) -> None:
                task_status.started()
                with anyio.fail_after(10):
                    async for event in coordinator.events(types={COMPLETED}):
                        found.append(event)
                        return

            await tg.start(follow)
            await anyio.sleep(0.3)  # let the tail settle on the current end
            sent = await coordinator.send("echo", "after")
        assert [e.message_id for e in found] == [sent]


async def test_durable_subscription_catches_up_after_downtime(node: Factory) -> None:
    seen: list[str] = []

    async def audit(event: AgentEvent) -> None:
        seen.append(event.message_id or "")

    async def echo(message: Message) -> None:
        pass

    async with node("worker") as worker:
        worker.register("echo", echo)
        async with node("auditor-1") as auditor:
            auditor.subscribe_events("audit", audit, types=[COMPLETED])
            first = await worker.send("echo", 1)
            with anyio.fail_after(10):
                while first not in seen:
                    await anyio.sleep(0.02)
        # the auditor is down: these complete unobserved
        missed = [await worker.send("echo", i) for i in range(3)]
        await collect(worker, lambda es: sum(1 for e in es if e.type == COMPLETED) == 4)
        async with node("auditor-2") as auditor:
            auditor.subscribe_events("audit", audit, types=[COMPLETED])
            with anyio.fail_after(10):
                while not set(missed) <= set(seen):
                    await anyio.sleep(0.02)
    assert seen == [first, *missed]  # each once, in order, no handling events of its own


class StalledEvents:
    """A transport whose event writes never finish (Redis unreachable for events only)."""

    def __init__(self, inner: Any, events_stream: str) -> None:
        self._inner = inner
        self._events_stream = events_stream

    async def add_many(self, stream: str, datas: Sequence[bytes]) -> list[bytes]:
        if stream == self._events_stream:
            await anyio.sleep_forever()
        result: list[bytes] = await self._inner.add_many(stream, datas)
        return result

    async def add(self, stream: str, data: bytes) -> bytes:
        return (await self.add_many(stream, [data]))[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_full_event_buffer_drops_instead_of_stalling_handlers(prefix: str) -> None:
    config = make_config("redis://unused", prefix, "n1", publish_timeout_ms=100)
    memory = MemoryTransport()
    events_stream = f"{prefix}:{{events}}:stream"
    publisher = EventPublisher(events_stream, capacity=4, timeout_ms=100)
    handled: list[int] = []
    async with MultiAgentCoordinator(config, transport=StalledEvents(memory, events_stream),
                                     event_publisher=publisher) as coordinator:
        async def work(message: Message, context: Context) -> None:
            context.emit(AgentEventType.TOOL_CALL, {"n": message.payload})
            handled.append(message.payload)

        coordinator.register("work", work)
        for i in range(30):
            await coordinator.send("work", i)
        with anyio.fail_after(5):
            while len(handled) < 30:
                await anyio.sleep(0.01)
    assert sorted(handled) == list(range(30))
    assert publisher.dropped >= 30 * 3 - 4 - 500  # at most one buffer and one batch got through
    assert publisher.dropped > 0 and publisher.published == 0


async def test_publisher_disabled_publishes_nothing(node: Factory) -> None:
    async with node("n1", publish_events=False) as coordinator:
        async def echo(message: Message, context: Context) -> None:
            context.emit("agent:tool_call", {})

        coordinator.register("echo", echo)
        await coordinator.request("echo", 1, timeout=5)
        assert await coordinator.transport.length(coordinator.keys.events()) == 0


async def test_publisher_block_mode_waits_for_space() -> None:
    publisher = EventPublisher("s", capacity=1, block=True)
    event = make_event("agent:started", "a", "n", None)
    assert await publisher.publish(event)
    with anyio.move_on_after(0.1) as scope:
        await publisher.publish(event)
    assert scope.cancel_called and publisher.dropped == 0
    assert not publisher.publish_nowait(event) and publisher.dropped == 1


def test_since_conversion() -> None:
    assert after_id(None) is None
    assert after_id("0") == b"0-0"
    assert after_id("1700000000000-5") == b"1700000000000-5"
    assert after_id("1700000000000-5.3") == b"1700000000000-5.3"  # inside a batch entry
    assert after_id("1700000000000") == b"1699999999999-18446744073709551615"
    assert after_id(1700000000000) == after_id("1700000000000")
    assert after_id("2023-11-14T22:13:20Z") == after_id(1700000000000)
    assert after_id("2023-11-14T22:13:20") == after_id(1700000000000)
    with pytest.raises(Exception, match="since"):
        after_id("yesterday")


@pytest.mark.real_redis
async def test_events_command(real_server: Any, prefix: str) -> None:
    import json
    import subprocess
    import sys

    async with MultiAgentCoordinator(make_config(real_server.url, prefix, "n1")) as coordinator:
        async def echo(message: Message) -> None:
            pass

        coordinator.register("echo", echo)
        await coordinator.send("echo", 1, session_id="s1")
        await coordinator.send("echo", 2, session_id="s2")
        await collect(coordinator, lambda es: sum(1 for e in es if e.type == COMPLETED) == 2)

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "coordinator", "events", "--redis-url",
                               real_server.url, "--prefix", prefix, *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    lines = [json.loads(line) for line in run("--session", "s1", "--json").splitlines()]
    assert [(e["type"], e["session_id"]) for e in lines] == [(STARTED, "s1"), (COMPLETED, "s1")]
    table = run("--type", COMPLETED, "--agent", "echo").splitlines()
    assert len(table) == 2 and all("agent:completed" in line for line in table)
    assert len(run("--follow", "--since", "0", "--limit", "3").splitlines()) == 3
    assert run("--since", lines[-1]["stream_id"], "--session", "s1") == ""


async def write_batches(coordinator: MultiAgentCoordinator, sizes: Sequence[int]
                        ) -> list[AgentEvent]:
    """Append one entry per size (batches, as a node writes them), then an entry of one bare
    event (as older nodes wrote); returns the events in publishing order."""
    stream = coordinator.keys.events()
    publisher = EventPublisher(stream)
    published: list[AgentEvent] = []
    for size in sizes:
        batch = [make_event(STARTED, "a", "n1", None, {"i": len(published) + i})
                 for i in range(size)]
        for event in batch:
            assert publisher.publish_nowait(event)
        await publisher._write(coordinator.transport, list(publisher._buffer))
        publisher._buffer.clear()
        published += batch
    legacy = make_event(COMPLETED, "a", "n0", None, {"i": len(published)})
    await coordinator.transport.add(stream, codec.encode_event(legacy))
    return published + [legacy]


async def test_batch_entries_read_as_single_events_with_positions(node: Factory) -> None:
    async with node("reader") as coordinator:
        published = await write_batches(coordinator, [3, 1, 4])
        read = [e async for e in coordinator.events(since="0", follow=False)]
        assert [e.data["i"] for e in read] == list(range(9))
        assert [e.id for e in read] == [e.id for e in published]  # ids given at publish stay
        positions = [e.stream_id for e in read]
        entries = [p.partition(".")[0] for p in positions]
        assert len(set(entries)) == 4  # three batches and the bare event
        assert [p.partition(".")[2] for p in positions] == ["0", "1", "2", "0", "0", "1", "2",
                                                            "3", ""]
        for k, position in enumerate(positions):  # resume anywhere: no gap, no repeat
            rest = [e async for e in coordinator.events(since=position, follow=False)]
            assert [e.data["i"] for e in rest] == list(range(k + 1, 9)), position


async def test_events_named_after_their_batch_are_stable(node: Factory) -> None:
    async with node("worker") as coordinator:
        async def echo(message: Message) -> None:
            pass

        coordinator.register("echo", echo)
        await coordinator.send("echo", 1)
        first = await collect(coordinator, lambda es: any(e.type == COMPLETED for e in es))
        again = [e async for e in coordinator.events(since="0", follow=False)]
    assert [e.id for e in first] == [e.id for e in again]  # what the archive dedups by
    assert len({e.id for e in again}) == len(again) == 2


async def test_durable_subscriber_gets_every_event_of_a_batch_at_least_once(
        node: Factory) -> None:
    seen: list[int] = []
    failed = False

    async def audit(event: AgentEvent) -> None:
        nonlocal failed
        if event.data["i"] == 4 and not failed:
            failed = True
            raise RuntimeError("flaky auditor")
        seen.append(event.data["i"])

    async with node("writer") as writer:
        await write_batches(writer, [3, 4])
        async with node("auditor") as auditor:
            auditor.subscribe_events("audit", audit)
            with anyio.fail_after(10):
                while set(seen) != set(range(8)):
                    await anyio.sleep(0.02)
    assert failed and sorted(set(seen)) == list(range(8))
    assert seen.count(3) == 2  # the failing entry was delivered again, from its start
    assert all(seen.count(i) == 1 for i in (0, 1, 2, 5, 6, 7))


async def test_an_event_msgpack_cannot_carry_is_dropped_alone(node: Factory) -> None:
    async with node("n1") as coordinator:
        publisher = EventPublisher(coordinator.keys.events())
        good = make_event(STARTED, "a", "n1", None, {"i": 0})
        assert publisher.publish_nowait(good)
        assert not publisher.publish_nowait(make_event(STARTED, "a", "n1", None,
                                                       {"bad": object()}))
        assert not publisher.publish_about(STARTED, "a", "n1", make_envelope("a", None),
                                           {"bad": object()}, 1)
        # Data is encoded when published: what the caller changes afterwards is not sent.
        later: dict[str, Any] = {"i": 1}
        assert publisher.publish_about(STARTED, "a", "n1", make_envelope("a", None), later, 2)
        later["bad"] = object()
        await publisher._write(coordinator.transport, list(publisher._buffer))
        read = [e async for e in coordinator.events(since="0", follow=False)]
    assert [e.data for e in read] == [{"i": 0}, {"i": 1}] and read[0].id == good.id
    assert publisher.dropped == 2 and publisher.published == 2


@pytest.mark.parametrize("size", [0, 1, 15, 16, 500, 65_536])
def test_a_batch_of_encoded_events_is_the_batch_msgspec_would_write(size: int) -> None:
    fields = [(STARTED.value, "a", "n1", None, f"m{i}", i, None, {"i": i}, "")
              for i in range(size)]
    joined = codec.encode_event_batch("b1", [codec.encode_packed_event(f) for f in fields])
    whole = codec.encode_event(EventBatch(id="b1", events=[PackedEvent(*f) for f in fields]))
    assert joined == whole
    decoded = codec.decode_event({codec.FIELD: joined})
    assert isinstance(decoded, EventBatch) and len(decoded.events) == size


async def test_queued_events_do_not_wake_the_garbage_collector() -> None:
    """A busy node holds thousands of events until their batch is written: as Python objects
    they made young collections run ~20 times as often."""
    publisher = EventPublisher("events")
    about = make_envelope("a", None)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(1_000):
            publisher.publish_about(STARTED, "a", "n1", about, {"deliveries": 1}, i)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert publisher.buffered == 1_000 and grown < 100
