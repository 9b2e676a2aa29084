"""Crash: a consumer node process is SIGKILLed while messages flow; a live peer takes over its
pending entries once its heartbeat expires, and every message is handled at least once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from coordinator import codec
from coordinator.consumer import GroupConsumer
from coordinator.delivery import Delivery, StreamSpec
from coordinator.envelope import NodeInfo
from coordinator.keys import Keys
from coordinator.producer import make_envelope
from coordinator.registry import Heartbeat, Registry, now_ms
from coordinator.transport import RedisTransport

pytestmark = [pytest.mark.anyio, pytest.mark.real_redis, pytest.mark.slow]

PROCESSES = Path(__file__).resolve().parents[1] / "processes"
sys.path.insert(0, str(PROCESSES))
from consumer_node import CONFIG, HANDLE_S  # noqa: E402

TOTAL = 5_000


async def test_sigkilled_node_loses_nothing_and_a_peer_takes_over_in_time(
        real_transport: RedisTransport, real_server: Any, keys: Keys) -> None:
    transport = real_transport
    inbox = keys.inbox("a")
    counts = f"{keys.prefix}:handled"
    registry = Registry(transport, keys, CONFIG.heartbeat_ttl_ms)
    await transport.ensure_group(inbox.stream, "a")

    with tempfile.TemporaryFile() as errors:
        node = subprocess.Popen(
            [sys.executable, str(PROCESSES / "consumer_node.py"), real_server.url, keys.prefix,
             "n1", counts], stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
        try:
            await run_crash(transport, registry, inbox, counts, node)
        finally:
            if node.poll() is None:
                node.kill()
            node.wait(10)
            if node.stdout:
                node.stdout.close()


async def run_crash(transport: RedisTransport, registry: Registry, inbox: Any, counts: str,
                    node: subprocess.Popen[bytes]) -> None:
    assert node.stdout is not None
    with anyio.fail_after(15):
        line = await anyio.to_thread.run_sync(node.stdout.readline)
    assert line.strip() == b"ready", line

    async def handler(d: Delivery) -> None:
        await anyio.sleep(HANDLE_S)
        n = codec.decode_payload(d.envelope.payload)  # type: ignore[union-attr]
        await transport.client.hincrby(counts, str(n), 1)

    started = now_ms()

    def info() -> NodeInfo:
        return NodeInfo(node_id="n2", host=socket.gethostname(), pid=os.getpid(), agents=["a"],
                        started_ms=started, beat_ms=now_ms())

    survivor = GroupConsumer(transport, StreamSpec(inbox, "a", "n2"), handler, CONFIG,
                             alive=registry.alive)
    sent = 0

    async def produce() -> None:
        nonlocal sent
        for start in range(0, TOTAL, 50):
            await transport.add_many(inbox.stream, [codec.encode(make_envelope("a", i))
                                                    for i in range(start, start + 50)])
            sent = start + 50
            await anyio.sleep(0.01)

    async def handled() -> int:
        return int(await transport.client.hlen(counts))

    async def pending_of(consumer: str) -> int:
        return len(await transport.pending(inbox.stream, "a", 10_000, consumer))

    async with anyio.create_task_group() as tg:
        await tg.start(Heartbeat(registry, info, CONFIG.heartbeat_interval_ms).run)
        await tg.start(survivor.run)
        tg.start_soon(produce)
        with anyio.fail_after(20):
            while await handled() < 1_500 or not await pending_of("n1"):
                await anyio.sleep(0.005)
        node.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await anyio.to_thread.run_sync(node.wait)
        orphaned = await pending_of("n1")
        with anyio.fail_after(10):
            while await pending_of("n1"):
                await anyio.sleep(0.02)
        taken_s = time.monotonic() - killed
        with anyio.fail_after(20):
            while sent < TOTAL or await handled() < TOTAL:
                await anyio.sleep(0.05)
            while survivor.in_flight or (await transport.groups(inbox.stream))[0].pending:
                await anyio.sleep(0.05)
        survivor.stop()
        tg.cancel_scope.cancel()

    per_id = {int(k): int(v) for k, v in (await transport.client.hgetall(counts)).items()}
    missing = set(range(TOTAL)) - set(per_id)
    duplicates = sorted(n for n, c in per_id.items() if c > 1)
    print(f"\ncrash test: {orphaned} entries pending on the killed node, taken over in "
          f"{taken_s:.2f} s; {len(duplicates)} handled twice: {duplicates}")
    assert not missing, f"lost {len(missing)} messages: {sorted(missing)[:20]}"
    assert orphaned > 0, "the node died with nothing in flight: not a mid-batch crash"
    assert taken_s <= CONFIG.heartbeat_ttl_ms / 1000 + 1, taken_s
    assert survivor.stats.reclaimed >= orphaned
    assert "n1" not in {c.name for c in await transport.consumers(inbox.stream, "a")}
