"""Node registry: every node writes a heartbeat key with a TTL; an expired key means dead."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import anyio

from . import codec
from .envelope import NodeInfo
from .errors import CodecError, TransportError
from .keys import Keys
from .transport import StreamTransport

log = logging.getLogger(__name__)


def now_ms() -> int:
    """Wall-clock milliseconds (the unit of stream ids)."""
    return time.time_ns() // 1_000_000  # a third cheaper than int(time.time() * 1000)


class Registry:
    """Reads and writes node heartbeats."""

    def __init__(self, transport: StreamTransport, keys: Keys, ttl_ms: int) -> None:
        self._transport = transport
        self._keys = keys
        self.ttl_ms = ttl_ms

    async def beat(self, info: NodeInfo) -> None:
        """Write one heartbeat (the key expires after the TTL unless renewed)."""
        await self._transport.put_ttl(self._keys.node(info.node_id), codec.encode(info),
                                      self.ttl_ms)
        await self._transport.index_add(self._keys.nodes, info.node_id, info.beat_ms)

    async def alive(self, node_ids: Sequence[str]) -> list[bool]:
        """Whether each node still has a live heartbeat."""
        found = await self._transport.get_many([self._keys.node(n) for n in node_ids])
        return [value is not None for value in found]

    async def nodes(self) -> list[NodeInfo]:
        """Every live node, and prune index entries of nodes dead for long."""
        members = await self._transport.index_members(self._keys.nodes)
        names = [name for name, _ in members]
        values = await self._transport.get_many([self._keys.node(n) for n in names])
        live: list[NodeInfo] = []
        stale: list[str] = []
        cutoff = now_ms() - 24 * 3600 * 1000
        for (name, beat), value in zip(members, values):
            if value is None:
                if beat < cutoff:
                    stale.append(name)
                continue
            try:
                live.append(codec.decode_node(value))
            except CodecError:
                log.warning("unreadable heartbeat record", extra={"node_id": name})
        await self._transport.index_remove(self._keys.nodes, *stale)
        return live

    async def deregister(self, node_id: str) -> None:
        """Remove a node's heartbeat at once (graceful stop)."""
        await self._transport.delete_keys(self._keys.node(node_id))
        await self._transport.index_remove(self._keys.nodes, node_id)


class Heartbeat:
    """Keeps one node's heartbeat alive until cancelled."""

    def __init__(self, registry: Registry, info: Callable[[], NodeInfo], interval_ms: int) -> None:
        self._registry = registry
        self._info = info
        self._interval_s = interval_ms / 1000

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Beat now (so the node is visible once started), then every interval."""
        await self._registry.beat(self._info())
        task_status.started()
        while True:
            await anyio.sleep(self._interval_s)
            try:
                await self._registry.beat(self._info())
            except TransportError as exc:  # lost connection, OOM, READONLY, LOADING...
                log.warning("heartbeat failed: %s", exc)
