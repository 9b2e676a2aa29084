"""Worker roles doing the same work with what users would pick instead of us.

- FastStream's Redis Streams subscriber: a consumer group, ack after the handler (its default
  ack policy), logging off; ``--mode batch`` (``StreamSub(batch=True, max_records=...)``, its
  fastest setup) or ``--mode single`` (one message per handler call, its default); the producer
  calls ``broker.publish(..., stream=...)`` from ``--concurrency`` tasks, or paced with a send
  timestamp for latency runs;
- taskiq-redis's ``RedisStreamBroker``: ``task.kiq(payload)`` from ``--concurrency`` tasks and
  a receiver acking when the task has run (``AcknowledgeType.WHEN_EXECUTED``).

Throughput consumers just run; the parent watches their consumer group in Redis. The latency
consumer reports its publish->handler latencies once it has seen ``--messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from .harness import cpu_s, emit, filler_for
from .loadgen import gaps_ms, paced, payload_for, spread

TASK_NAME = "bench_sink"


def _faststream_broker(url: str) -> Any:
    from faststream.redis import RedisBroker

    return RedisBroker(url, logger=None)  # per-message logging off: its fastest setup


async def faststream_consumer(opts: argparse.Namespace) -> None:
    """Subscribe, run until killed (or, latency runs, until ``--messages`` were seen)."""
    from faststream.redis import StreamSub

    broker = _faststream_broker(opts.url)
    latencies: list[float] = []
    enough = asyncio.Event()
    batch = opts.mode == "batch"
    sub = StreamSub(opts.stream, group=opts.agent, consumer="bench-c1", batch=batch,
                    max_records=opts.batch if batch else None)

    if batch:
        @broker.subscriber(stream=sub)
        async def handle_batch(body):  # type: ignore[no-untyped-def]
            return None
    else:
        @broker.subscriber(stream=sub)
        async def handle(body):  # type: ignore[no-untyped-def]
            if opts.rate:
                latencies.append(time.time() - body["t"])
                if len(latencies) >= opts.messages:
                    enough.set()

    await broker.start()
    try:
        emit("ready")
        if opts.rate:
            await enough.wait()
            emit("done", latencies=latencies)
        else:
            await asyncio.sleep(opts.timeout_s)
    finally:
        await broker.stop()


async def faststream_producer(opts: argparse.Namespace) -> None:
    """``broker.publish`` to the stream, concurrently or paced."""
    broker = _faststream_broker(opts.url)
    filler = filler_for(opts.payload_bytes)
    await broker.connect()
    try:
        async def send(i: int) -> None:
            await broker.publish(payload_for(opts, filler, i), stream=opts.stream)

        cpu0, t_first, gaps = cpu_s(), time.time(), None
        if opts.rate:
            gaps = gaps_ms(await paced(opts.rate, opts.messages, send))
        else:
            await spread(opts.messages, opts.concurrency, send)
        emit("done", t_first=t_first, t_last=time.time(), cpu_s=cpu_s() - cpu0, gaps=gaps)
    finally:
        await broker.stop()


async def _sink(payload: Any) -> None:
    return None


def _taskiq_broker(opts: argparse.Namespace) -> Any:
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(opts.url, queue_name=opts.stream,
                               consumer_group_name=opts.agent, consumer_id="0")
    return broker, broker.register_task(_sink, task_name=TASK_NAME)


async def taskiq_consumer(opts: argparse.Namespace) -> None:
    """A receiver with 100 async task slots, acking after each task ran."""
    from taskiq.acks import AcknowledgeType
    from taskiq.api import run_receiver_task

    broker, _ = _taskiq_broker(opts)
    broker.is_worker_process = True
    await broker.startup()
    try:
        emit("ready")
        receiver = asyncio.create_task(run_receiver_task(
            broker, max_async_tasks=100, ack_time=AcknowledgeType.WHEN_EXECUTED))
        await asyncio.sleep(opts.timeout_s)
        receiver.cancel()
    finally:
        await broker.shutdown()


async def taskiq_producer(opts: argparse.Namespace) -> None:
    """``task.kiq(payload)`` from ``--concurrency`` tasks."""
    broker, task = _taskiq_broker(opts)
    filler = filler_for(opts.payload_bytes)
    await broker.startup()
    try:
        async def send(i: int) -> None:
            await task.kiq(payload_for(opts, filler, i))

        cpu0, t_first = cpu_s(), time.time()
        await spread(opts.messages, opts.concurrency, send)
        emit("done", t_first=t_first, t_last=time.time(), cpu_s=cpu_s() - cpu0)
    finally:
        await broker.shutdown()
