"""Worker roles that drive the product path and the latency runs of engine and baseline.

- ``node-producer``: ``MultiAgentCoordinator.send_many`` in ``--batch`` batches (``--batch 1``:
  ``send`` from ``--concurrency`` tasks; round robin
  over ``--agents`` agents), or paced at ``--rate`` msg/s with a send timestamp in each payload;
- ``reqrep-client``: ``--concurrency`` tasks calling ``MultiAgentCoordinator.request``;
- ``engine-lat-producer`` / ``engine-lat-consumer``: ``RedisTransport.add`` one at a time and a
  :class:`GroupConsumer` noting publish->handler latency;
- ``baseline-lat-producer`` / ``baseline-lat-consumer``: the same with plain redis-py.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from .harness import cpu_s, emit, filler_for, make_payload
from .report import percentile


def payload_for(opts: argparse.Namespace, filler: str, i: int) -> dict[str, Any]:
    """The i-th payload; with ``--rate`` it carries its send time ``t``."""
    payload = make_payload(i, filler)
    if opts.rate:
        payload["t"] = time.time()
    return payload


# The event loop's timers fire up to 1 ms late (epoll waits whole milliseconds, rounded up):
# paced by them alone, a 1,000 msg/s producer sends in bursts, a fifth of its messages within
# 0.2 ms of the previous one. The last stretch of each wait is slept exactly instead, so every
# producer offers the same evenly spaced load as the blocking ones.
_TIMER_SLACK_S = 0.002


async def paced(rate: float, n: int, send: Callable[[int], Awaitable[object]]
                ) -> list[float]:
    """Call ``send(i)`` for ``i < n`` at ``rate`` per second (catching up when late); returns
    when each call started (``perf_counter``)."""
    start = time.perf_counter()
    started: list[float] = []
    for i in range(n):
        due = start + i / rate
        if due - time.perf_counter() > _TIMER_SLACK_S:
            await anyio.sleep(due - time.perf_counter() - _TIMER_SLACK_S)
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # blocks the loop below 2 ms, with nothing of ours in flight
        started.append(time.perf_counter())
        await send(i)
    return started


def paced_sync(rate: float, n: int, send: Callable[[int], object]) -> list[float]:
    """:func:`paced` for blocking code."""
    start = time.perf_counter()
    started: list[float] = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        started.append(time.perf_counter())
        send(i)
    return started


def gaps_ms(started: list[float]) -> dict[str, float]:
    """How evenly paced sends were: the 1st percentile and median of the time between two
    consecutive sends, in ms (1.0 and 1.0 at 1,000 msg/s, evenly)."""
    gaps = [later - earlier for earlier, later in zip(started, started[1:])]
    return {"p1": percentile(gaps, 1) * 1e3, "p50": percentile(gaps, 50) * 1e3}


async def spread(n: int, tasks: int, send: Callable[[int], Awaitable[object]]) -> None:
    """Call ``send(i)`` for every ``i < n`` from ``tasks`` concurrent tasks."""
    async def worker(first: int) -> None:
        for i in range(first, n, tasks):
            await send(i)

    async with anyio.create_task_group() as tg:
        for k in range(min(tasks, n)):
            tg.start_soon(worker, k)


def _coordinator(opts: argparse.Namespace, role: str) -> Any:
    from coordinator import MultiAgentCoordinator
    from coordinator.config import CoordinatorConfig

    from .tracing import install_from_env

    install_from_env()

    return MultiAgentCoordinator(CoordinatorConfig.from_url(
        opts.url, prefix=opts.prefix, node_id=f"bench-{role}-{uuid.uuid4().hex[:6]}"))


async def node_producer(opts: argparse.Namespace) -> None:
    """Send N messages through the facade to agents ``b0..`` (or ``--agent``)."""
    filler = filler_for(opts.payload_bytes)
    agents = [opts.agent] if opts.agents <= 1 else [f"b{k}" for k in range(opts.agents)]
    async with _coordinator(opts, "producer") as coordinator:
        async def send(i: int) -> None:
            await coordinator.send(agents[i % len(agents)], payload_for(opts, filler, i))

        async def send_batch(start: int) -> None:
            # The facade's bulk path, as the baseline pipelines its XADDs in batches.
            end = min(opts.messages, start + opts.batch)
            by_agent: dict[str, list[dict[str, Any]]] = {}
            for i in range(start, end):
                by_agent.setdefault(agents[i % len(agents)], []).append(
                    payload_for(opts, filler, i))
            if len(by_agent) == 1:
                await coordinator.send_many(agents[0], by_agent[agents[0]])
                return
            async with anyio.create_task_group() as tg:  # as an application would: at once
                for agent, payloads in by_agent.items():
                    tg.start_soon(coordinator.send_many, agent, payloads)

        cpu0, t_first, gaps = cpu_s(), time.time(), None
        if opts.rate:
            gaps = gaps_ms(await paced(opts.rate, opts.messages, send))
        elif opts.batch > 1:
            for start in range(0, opts.messages, opts.batch):
                await send_batch(start)
        else:
            await spread(opts.messages, opts.concurrency, send)
        emit("done", t_first=t_first, t_last=time.time(), cpu_s=cpu_s() - cpu0, gaps=gaps)


async def reqrep_client(opts: argparse.Namespace) -> None:
    """Round trips from ``--concurrency`` callers for ``--duration-s`` after a 0.5 s warm-up."""
    payload = {"q": "x" * 40}
    latencies: list[float] = []
    async with _coordinator(opts, "caller") as coordinator:
        await coordinator.request(opts.agent, payload, timeout=30)  # the first one is slow
        warm_until = time.perf_counter() + 0.5
        stop_at = warm_until + opts.duration_s

        async def caller() -> None:
            while (now := time.perf_counter()) < stop_at:
                await coordinator.request(opts.agent, payload, timeout=30)
                if now >= warm_until:
                    latencies.append(time.perf_counter() - now)

        async with anyio.create_task_group() as tg:
            for _ in range(opts.concurrency):
                tg.start_soon(caller)
        emit("done", latencies=latencies, seconds=opts.duration_s)


async def engine_lat_producer(opts: argparse.Namespace) -> None:
    """``RedisTransport.add`` of one envelope at a time, paced."""
    from coordinator import codec
    from coordinator.config import RedisConfig
    from coordinator.producer import make_envelope
    from coordinator.transport import RedisTransport

    filler = filler_for(opts.payload_bytes)
    transport = await RedisTransport.connect(RedisConfig(url=opts.url))
    try:
        async def send(i: int) -> None:
            await transport.add(opts.stream, codec.encode(
                make_envelope(opts.agent, payload_for(opts, filler, i))))

        emit("done", gaps=gaps_ms(await paced(opts.rate, opts.messages, send)))
    finally:
        await transport.close()


async def engine_lat_consumer(opts: argparse.Namespace) -> None:
    """A default :class:`GroupConsumer` whose handler notes publish->handler latency."""
    from coordinator import codec
    from coordinator.config import DeliveryConfig, RedisConfig
    from coordinator.consumer import GroupConsumer
    from coordinator.delivery import Delivery, StreamSpec
    from coordinator.keys import Keys
    from coordinator.transport import RedisTransport

    latencies: list[float] = []
    enough = anyio.Event()

    async def handler(delivery: Delivery) -> None:
        assert delivery.envelope is not None
        latencies.append(time.time() - codec.decode_payload(delivery.envelope.payload)["t"])
        if len(latencies) >= opts.messages:
            enough.set()

    transport = await RedisTransport.connect(RedisConfig(url=opts.url))
    spec = StreamSpec(Keys(opts.prefix).inbox(opts.agent), opts.agent, "bench-c1")
    consumer = GroupConsumer(transport, spec, handler, DeliveryConfig())
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run)
            emit("ready")
            await enough.wait()
            consumer.stop()
        emit("done", latencies=latencies)
    finally:
        await transport.close()


def baseline_lat_producer(opts: argparse.Namespace) -> None:
    """One XADD per message (sync redis-py), paced; same envelope bytes as the engine's."""
    import redis

    from .workers import baseline_message

    encode = msgspec.msgpack.Encoder().encode
    filler = filler_for(opts.payload_bytes)
    client = redis.Redis.from_url(opts.url)
    try:
        def send(i: int) -> None:
            data = encode(baseline_message(uuid.uuid4().hex, opts.agent,
                                           int(time.time() * 1000),
                                           encode(payload_for(opts, filler, i))))
            client.xadd(opts.stream, {b"e": data})

        emit("done", gaps=gaps_ms(paced_sync(opts.rate, opts.messages, send)))
    finally:
        client.close()


def baseline_lat_consumer(opts: argparse.Namespace) -> None:
    """XREADGROUP COUNT 256 BLOCK, decode, note latency, one XACK per batch."""
    import redis

    decode = msgspec.msgpack.Decoder().decode
    client = redis.Redis.from_url(opts.url)
    latencies: list[float] = []
    try:
        client.xgroup_create(opts.stream, opts.agent, id="0", mkstream=True)
        emit("ready")
        deadline = time.monotonic() + opts.timeout_s
        while len(latencies) < opts.messages and time.monotonic() < deadline:
            reply = client.xreadgroup(opts.agent, "bench-c1", {opts.stream: ">"}, count=256,
                                      block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            for _, fields in entries:
                envelope = decode(fields[b"e"])
                latencies.append(time.time() - envelope["payload"]["t"])
            client.xack(opts.stream, opts.agent, *[entry_id for entry_id, _ in entries])
        emit("done", latencies=latencies)
    finally:
        client.close()
