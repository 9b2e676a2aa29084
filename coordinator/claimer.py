"""Claimer: takes over entries whose consumer died or went silent.

Two ways, every ``claim_interval_ms``:
1. dead nodes: a consumer whose node heartbeat expired has its pending entries claimed at once
   (no need to wait for the idle threshold), then is removed from the group;
2. the backstop: XAUTOCLAIM of entries idle past ``claim_idle_ms``, resuming from a kept
   cursor rather than rescanning from 0-0 every round. Ids deleted while pending are acked
   (Redis 7 reports them; on 6.2 they come back as nil and are found by the transport).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from .config import DeliveryConfig
from .delivery import ConsumerStats, StreamSpec
from .errors import GroupMissing, TransportError
from .transport import Entry, StreamTransport

log = logging.getLogger(__name__)

#: Most entries taken over in one round (per mechanism).
CLAIM_BATCH = 256


class ClaimSink(Protocol):
    """Where claimed entries go: the consumer that owns the handler slots."""

    def reserve(self, wanted: int, priority: bool = False) -> int: ...
    def unreserve(self, n: int) -> None: ...
    def holds(self, entry_id: bytes) -> bool: ...
    async def accept(self, entries: list[Entry], counts: dict[bytes, int] | None) -> None: ...
    async def wait_for_room(self) -> None: ...


class Claimer:
    """Runs both claim mechanisms for one consumer."""

    def __init__(self, transport: StreamTransport, spec: StreamSpec, config: DeliveryConfig,
                 sink: ClaimSink,
                 alive: Callable[[Sequence[str]], Awaitable[list[bool]]] | None,
                 stats: ConsumerStats | None = None) -> None:
        self._transport = transport
        self._stats = stats
        self._spec = spec
        self._config = config
        self._sink = sink
        self._alive = alive
        self._cursor = b"0-0"
        self._scope = anyio.CancelScope()
        # Dead nodes are looked for every quarter heartbeat TTL (at most every claim interval).
        self._dead_every_ms = max(50, min(config.claim_interval_ms,
                                          config.heartbeat_ttl_ms // 4))
        self.reclaimed = 0

    def stop(self) -> None:
        """Stop claiming (graceful stop: take on no new work)."""
        self._scope.cancel()

    async def run(self) -> None:
        """Look for dead nodes every quarter heartbeat TTL (at most every claim interval), so
        their work is taken within about TTL + TTL/4; run the idle backstop every interval."""
        idle_every = max(1, self._config.claim_interval_ms // self._dead_every_ms)
        rounds = 0
        with self._scope:
            while True:
                await anyio.sleep(self._dead_every_ms / 1000)
                rounds += 1
                try:
                    await self.reclaim_dead()
                    if rounds % idle_every == 0:
                        await self.claim_idle()
                except GroupMissing:
                    pass  # the reader recreates the group
                except TransportError as exc:  # lost connection, or the key vanished mid-round
                    log.warning("claimer: %s", exc)

    def _count(self, n: int) -> None:
        self.reclaimed += n
        if self._stats is not None:
            self._stats.reclaimed += n

    async def reclaim_dead(self) -> int:
        """Take over the pending entries of consumers whose node has no heartbeat."""
        if self._alive is None:
            return 0
        spec = self._spec
        others = [c for c in await self._transport.consumers(spec.keys.stream, spec.group)
                  if c.name != spec.consumer]
        if not others:
            return 0
        taken = 0
        alive = await self._alive([c.name for c in others])
        for consumer, is_alive in zip(others, alive):
            if is_alive:
                continue
            if consumer.pending:
                taken += await self._take_from(consumer.name)
            else:
                await self._transport.delete_idle_consumer(spec.keys.stream, spec.group,
                                                           consumer.name)
        return taken

    async def _take_from(self, dead: str) -> int:
        """Take over a dead consumer's pending entries, then remove it from the group.

        A batch at a time, the next one as soon as the sink has room again rather than a
        round later: a dead node may hold thousands. When the sink stays full for a round
        (slow handlers), the next round goes on.
        """
        taken, more = 0, True
        while more:
            n, more = await self._take_batch(dead)
            taken += n
            if more:
                with anyio.move_on_after(self._dead_every_ms / 1000) as waited:
                    await self._sink.wait_for_room()
                if waited.cancelled_caught:
                    break
        if taken:
            log.warning("took over %d entries of dead node %s", taken, dead,
                        extra={"stream": self._spec.keys.stream, "dead_node": dead})
        return taken

    async def _take_batch(self, dead: str) -> tuple[int, bool]:
        """Claim one batch of ``dead``'s entries; returns how many, and whether it has more
        (when not, it is removed from the group)."""
        spec = self._spec
        n = self._sink.reserve(CLAIM_BATCH, priority=True)
        if not n:
            return 0, True
        try:
            pending = await self._transport.pending(spec.keys.stream, spec.group, n, dead)
            # min idle guards against two live peers claiming the same entry twice: after the
            # first claim its idle time is ~0 again.
            entries = await self._transport.claim(
                spec.keys.stream, spec.group, spec.consumer,
                self._config.heartbeat_ttl_ms // 2, [p.id for p in pending])
        except BaseException:
            self._sink.unreserve(n)
            raise
        self._sink.unreserve(n - len(entries))
        counts = {p.id: p.deliveries + 1 for p in pending}
        await self._sink.accept(entries, counts)
        self._count(len(entries))
        if len(pending) == n and entries:
            return len(entries), True
        # Fewer pending than asked for: drained. None claimed: a peer took them meanwhile.
        if len(pending) < n:
            try:
                await self._transport.delete_idle_consumer(spec.keys.stream, spec.group, dead)
            except TransportError as exc:
                log.debug("could not remove consumer %s: %s", dead, exc)
        return len(entries), False

    async def claim_idle(self) -> int:
        """One XAUTOCLAIM round past the idle threshold, continuing from the kept cursor."""
        spec = self._spec
        n = self._sink.reserve(CLAIM_BATCH)
        if not n:
            return 0
        try:
            batch = await self._transport.claim_idle(
                spec.keys.stream, spec.group, spec.consumer, self._config.claim_idle_ms,
                self._cursor, n)
            self._cursor = batch.cursor
            if batch.deleted:
                await self._transport.ack(spec.keys.stream, spec.group, batch.deleted)
            fresh = [e for e in batch.entries if not self._sink.holds(e.id)]
            counts = None
            if fresh:
                pending = await self._transport.pending(
                    spec.keys.stream, spec.group, CLAIM_BATCH * 4, spec.consumer,
                    fresh[0].id, fresh[-1].id)
                counts = {p.id: p.deliveries for p in pending}
        except BaseException:
            self._sink.unreserve(n)
            raise
        self._sink.unreserve(n - len(fresh))
        await self._sink.accept(fresh, counts)
        self._count(len(fresh))
        if fresh:
            log.info("claimed %d idle entries", len(fresh), extra={"stream": spec.keys.stream})
        return len(fresh)
