"""The processes of a throughput measurement: ``python -m benchmarks.workers ROLE ...``.

Roles come in pairs doing the same work: ``engine-producer`` / ``engine-consumer`` go through
the coordinator (envelopes, ``RedisTransport.add_many``, ``GroupConsumer``), while
``baseline-producer`` / ``baseline-consumer`` are the hand-written optimum in plain sync
redis-py (pipelined XADD; XREADGROUP COUNT 256 BLOCK, msgpack decode, one XACK per batch).

Each consumer says ``ready`` once its group exists, and ``done`` with the wall-clock time at
which its last ack returned. Each producer says ``done`` with the time of its first send.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from .harness import cpu_s, die_with_parent, emit, filler_for, make_payload

#: Consumer group and consumer names used by both implementations.
GROUP = "bench"
CONSUMER = "bench-c1"
AGENT = "bench"


# -- the coordinator ------------------------------------------------------------------------
async def engine_producer(opts: argparse.Namespace) -> None:
    """Send envelopes in pipelined batches through the transport."""
    from coordinator import codec
    from coordinator.config import RedisConfig
    from coordinator.keys import Keys
    from coordinator.producer import make_envelope
    from coordinator.transport import RedisTransport

    stream = Keys(opts.prefix).inbox(AGENT).stream
    filler = filler_for(opts.payload_bytes)
    transport = await RedisTransport.connect(RedisConfig(url=opts.url))
    try:
        await transport.ping()
        cpu0, t_first = cpu_s(), time.time()
        for start in range(0, opts.messages, opts.batch):
            end = min(opts.messages, start + opts.batch)
            await transport.add_many(stream, [
                codec.encode(make_envelope(AGENT, make_payload(i, filler)))
                for i in range(start, end)])
        emit("done", t_first=t_first, t_last=time.time(), cpu_s=cpu_s() - cpu0)
    finally:
        await transport.close()


async def engine_consumer(opts: argparse.Namespace) -> None:
    """Run a :class:`GroupConsumer` with the default delivery config until N are acked."""
    import anyio

    from coordinator import codec
    from coordinator.config import DeliveryConfig, RedisConfig
    from coordinator.consumer import GroupConsumer
    from coordinator.delivery import Delivery, StreamSpec
    from coordinator.keys import Keys
    from coordinator.transport import RedisTransport

    target = opts.messages

    handled = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal handled
        assert delivery.envelope is not None
        codec.decode_payload(delivery.envelope.payload)
        handled += 1

    transport = await RedisTransport.connect(RedisConfig(url=opts.url))
    consumer = GroupConsumer(transport, StreamSpec(Keys(opts.prefix).inbox(AGENT), GROUP,
                                                   CONSUMER), handler, DeliveryConfig())
    try:
        with anyio.fail_after(opts.timeout_s):
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                cpu0 = cpu_s()
                emit("ready")
                # The consumer's own count of confirmed acks (some ride along with reads, so
                # no transport call sees them all), polled every 2 ms.
                while consumer.stats.acked < target:
                    await anyio.sleep(0.002)
                t_done, cpu = time.time(), cpu_s() - cpu0
                consumer.stop()
        emit("done", t_done=t_done, acked=consumer.stats.acked, handled=handled, cpu_s=cpu,
             stats=consumer.stats.as_dict())
    finally:
        await transport.close()


# -- the hand-written baseline --------------------------------------------------------------
def baseline_message(message_id: str, target: str, created_ms: int, payload: bytes) -> dict[
        str, Any]:
    """The envelope as a plain dict: msgpack-encodes to the same bytes as the coordinator's."""
    return {"kind": "msg", "id": message_id, "type": "multiagent:sync", "target": target,
            "sender": None, "sender_node": None, "session_id": None, "user_id": None,
            "created_ms": created_ms, "deadline_ms": None, "correlation_id": None,
            "reply_to": None, "traceparent": None, "tracestate": None, "headers": {},
            "payload": msgspec.Raw(payload)}


def baseline_producer(opts: argparse.Namespace) -> None:
    """Pipelined XADD batches of the same bytes, in sync redis-py."""
    import redis

    encode = msgspec.msgpack.Encoder().encode
    filler = filler_for(opts.payload_bytes)
    client = redis.Redis.from_url(opts.url)
    try:
        client.ping()
        pipe = client.pipeline(transaction=False)
        cpu0, t_first = cpu_s(), time.time()
        for start in range(0, opts.messages, opts.batch):
            for i in range(start, min(opts.messages, start + opts.batch)):
                data = encode(baseline_message(uuid.uuid4().hex, AGENT, int(time.time() * 1000),
                                               encode(make_payload(i, filler))))
                pipe.xadd(opts.stream, {b"e": data})
            pipe.execute()
        emit("done", t_first=t_first, t_last=time.time(), cpu_s=cpu_s() - cpu0)
    finally:
        client.close()


def baseline_consumer(opts: argparse.Namespace) -> None:
    """XREADGROUP COUNT 256 BLOCK, decode each message, one XACK per batch."""
    import redis

    decode = msgspec.msgpack.Decoder().decode
    client = redis.Redis.from_url(opts.url)
    try:
        client.xgroup_create(opts.stream, GROUP, id="0", mkstream=True)
        cpu0 = cpu_s()
        emit("ready")
        deadline = time.monotonic() + opts.timeout_s
        acked = handled = 0
        while acked < opts.messages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"acked {acked} of {opts.messages} in {opts.timeout_s}s")
            reply = client.xreadgroup(GROUP, CONSUMER, {opts.stream: ">"}, count=256,
                                      block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            for _, fields in entries:
                decode(fields[b"e"])  # the envelope and the payload inside it
            handled += len(entries)
            acked += client.xack(opts.stream, GROUP, *[entry_id for entry_id, _ in entries])
        t_done = time.time()
        emit("done", t_done=t_done, acked=acked, handled=handled, cpu_s=cpu_s() - cpu0)
    finally:
        client.close()


# -- entry ----------------------------------------------------------------------------------
#: role -> (module, function); async functions run under anyio (asyncio backend).
ROLES = {
    "engine-producer": ("workers", "engine_producer"),
    "engine-consumer": ("workers", "engine_consumer"),
    "baseline-producer": ("workers", "baseline_producer"),
    "baseline-consumer": ("workers", "baseline_consumer"),
    "node-producer": ("loadgen", "node_producer"),
    "reqrep-client": ("loadgen", "reqrep_client"),
    "engine-lat-producer": ("loadgen", "engine_lat_producer"),
    "engine-lat-consumer": ("loadgen", "engine_lat_consumer"),
    "baseline-lat-producer": ("loadgen", "baseline_lat_producer"),
    "baseline-lat-consumer": ("loadgen", "baseline_lat_consumer"),
    "faststream-producer": ("peers", "faststream_producer"),
    "faststream-consumer": ("peers", "faststream_consumer"),
    "taskiq-producer": ("peers", "taskiq_producer"),
    "taskiq-consumer": ("peers", "taskiq_consumer"),
}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every role takes (each uses the ones it needs)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", default="bench", help="key prefix (engine roles)")
    parser.add_argument("--stream", default="", help="stream name (baseline roles)")
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--agent", default=AGENT, help="agent id / consumer group")
    parser.add_argument("--agents", type=int, default=1, help="send round robin to b0..bK-1")
    parser.add_argument("--concurrency", type=int, default=64, help="sending tasks")
    parser.add_argument("--rate", type=float, default=0.0, help="paced msg/s (latency runs)")
    parser.add_argument("--duration-s", type=float, default=3.0, help="request/reply runs")
    parser.add_argument("--mode", default="single", choices=["single", "batch"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one role."""
    import importlib
    import inspect

    die_with_parent()
    opts = parse(argv)
    module, name = ROLES[opts.role]
    func = getattr(importlib.import_module(f"benchmarks.{module}"), name)
    if inspect.iscoroutinefunction(func):
        import anyio

        anyio.run(func, opts)
    else:
        func(opts)


if __name__ == "__main__":
    main()
