"""A consumer node process for crash tests: one GroupConsumer on an agent's inbox plus its
heartbeat. Every handled payload is counted in a Redis hash (HINCRBY), so a test sees what was
handled, and how often, even after this process was SIGKILLed.

usage: consumer_node.py REDIS_URL PREFIX NODE_ID COUNTS_KEY
Prints "ready" once its group exists and its first heartbeat is written.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coordinator import codec  # noqa: E402
from coordinator.config import DeliveryConfig, RedisConfig  # noqa: E402
from coordinator.consumer import GroupConsumer  # noqa: E402
from coordinator.delivery import Delivery, StreamSpec  # noqa: E402
from coordinator.envelope import NodeInfo  # noqa: E402
from coordinator.keys import Keys  # noqa: E402
from coordinator.registry import Heartbeat, Registry, now_ms  # noqa: E402
from coordinator.transport import RedisTransport  # noqa: E402

#: Shared with the test: the crash test's survivor uses the same settings.
CONFIG = DeliveryConfig(concurrency=16, heartbeat_ttl_ms=1_000, claim_idle_ms=30_000,
                        lease_renew_ms=500, claim_interval_ms=100, block_ms=100)
HANDLE_S = 0.004


async def main(url: str, prefix: str, node_id: str, counts: str) -> None:
    transport = await RedisTransport.connect(RedisConfig(url=url))
    keys = Keys(prefix)
    registry = Registry(transport, keys, CONFIG.heartbeat_ttl_ms)
    started = now_ms()

    def info() -> NodeInfo:
        return NodeInfo(node_id=node_id, host=socket.gethostname(), pid=os.getpid(),
                        agents=["a"], started_ms=started, beat_ms=now_ms())

    async def handler(d: Delivery) -> None:
        await anyio.sleep(HANDLE_S)
        n = codec.decode_payload(d.envelope.payload)  # type: ignore[union-attr]
        await transport.client.hincrby(counts, str(n), 1)

    consumer = GroupConsumer(transport, StreamSpec(keys.inbox("a"), "a", node_id), handler,
                             CONFIG, alive=registry.alive)
    async with anyio.create_task_group() as tg:
        await tg.start(Heartbeat(registry, info, CONFIG.heartbeat_interval_ms).run)
        await tg.start(consumer.run)
        print("ready", flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
