"""The ledger of one consumer: the entries it holds, their batched acks and their leases.

An entry stays held from delivery until its ack is confirmed (or it is dead-lettered, or lost).
While held, its lease (the entry's idle time in the group) is renewed only if this consumer
still owns it; acks of entries held long are checked for ownership, so a late ack after a
takeover is refused instead of acking another consumer's work.
"""

from __future__ import annotations

import logging

import anyio

from .config import DeliveryConfig
from .delivery import ConsumerStats, Delivery, StreamSpec, log_ids
from .errors import GroupMissing, TransportError
from .registry import now_ms
from .soon import NextPass
from .transport import AckWrite, Piggyback, StreamTransport

log = logging.getLogger("coordinator.consumer")


class Ledger:
    """Held entries, batched acks and lease renewal of one consumer."""

    def __init__(self, transport: StreamTransport, spec: StreamSpec, config: DeliveryConfig,
                 stats: ConsumerStats) -> None:
        self.spec = spec
        self.stats = stats
        self.held: dict[bytes, Delivery] = {}
        self._transport = transport
        self._config = config
        self._acks: list[Delivery] = []
        self._ack_ready = anyio.Event()
        # Not at once: the read sent next in this pass of the loop may carry the acks (see
        # _piggyback); the ack loop is woken only for what is still queued after it.
        self._wake_soon = NextPass(self._wake)
        # Acks of entries held longer than this are checked for ownership first.
        self._safe_ack_ms = min(config.lease_renew_ms, config.heartbeat_ttl_ms // 2)

    def queue_ack(self, delivery: Delivery) -> None:
        """Ack ``delivery`` with the next batch."""
        if delivery.lost:
            return
        self._acks.append(delivery)
        self._wake_soon()

    def _wake(self) -> None:
        if self._acks and not self._ack_ready.is_set():
            self._ack_ready.set()

    async def ack_loop(self) -> None:
        """Flush queued acks whenever some are waiting, until cancelled."""
        stop_piggyback = self._transport.piggyback(self._piggyback)
        try:
            while True:
                await self._ack_ready.wait()
                self._ack_ready = anyio.Event()
                try:
                    await self.flush_acks()
                except TransportError as exc:
                    log.warning("ack failed (%s); retrying", exc)
                    await anyio.sleep(0.2)
                    self._ack_ready.set()
        finally:
            stop_piggyback()

    def _piggyback(self) -> Piggyback | None:
        """The queued acks that need no ownership check, to send with a read."""
        plain, checked, _ = self._split(self._acks)
        if not plain:
            return None
        self._acks = checked  # left to the ack loop
        spec = self.spec

        def done(error: BaseException | None) -> None:
            if error is None:
                for delivery in plain:
                    self.held.pop(delivery.entry.id, None)
                self.stats.acked += len(plain)
            else:  # the ack loop tries again (GroupMissing included: it knows what to do)
                self._acks[:0] = plain
                self._wake()

        return Piggyback(AckWrite(spec.keys.stream, spec.group,
                                  [delivery.entry.id for delivery in plain]), done)

    def _split(self, queued: list[Delivery]) -> tuple[list[Delivery], list[Delivery], int]:
        """(plain, checked, now): acks of entries held long may have been taken over
        meanwhile, so theirs check ownership. Decided with one clock read per batch."""
        now, checked_since = now_ms(), self._safe_ack_ms
        if self._config.dedup_window_ms:  # every ack also records the message id
            checked_since = -1
        plain: list[Delivery] = []
        checked: list[Delivery] = []
        for delivery in queued:
            (checked if now - delivery.leased_ms >= checked_since else plain).append(delivery)
        return plain, checked, now

    async def flush_acks(self) -> None:
        """Ack everything queued now; refused (taken-over) entries are marked lost."""
        spec, inflight = self.spec, self.held
        queued, self._acks = self._acks, []
        plain, checked, now = self._split(queued)
        refused: set[bytes] = set()
        try:
            if plain:
                await self._transport.ack(spec.keys.stream, spec.group,
                                          [d.entry.id for d in plain])
            if checked:
                refused = set(await self._transport.ack_checked(
                    spec.keys.stream, spec.keys.dedup, spec.group, spec.consumer,
                    [(d.entry.id, d.envelope.id if d.envelope else "") for d in checked],
                    True, self._config.dedup_window_ms, now))
                for delivery in checked:
                    if delivery.entry.id in refused:
                        self.stats.refused_acks += 1
                        self.mark_lost(delivery)
        except GroupMissing:
            # The group vanished with its pending list: nothing is left to ack.
            for delivery in (*plain, *checked):
                inflight.pop(delivery.entry.id, None)
            return
        except BaseException:  # failed or cancelled mid-flush: keep them for the next flush
            self._acks[:0] = queued
            raise
        for delivery in plain:
            inflight.pop(delivery.entry.id, None)
        for delivery in checked:
            inflight.pop(delivery.entry.id, None)
        self.stats.acked += len(plain) + len(checked) - len(refused)

    async def renew_loop(self) -> None:
        """Renew leases every ``lease_renew_ms`` until cancelled."""
        interval_ms = self._config.lease_renew_ms
        while True:
            await anyio.sleep(interval_ms / 1000)
            try:
                # Half the interval: an entry leased just after a tick is renewed at the next
                # one, so its idle time stays under 1.5 intervals, below claim_idle_ms.
                await self.renew_leases(interval_ms // 2)
            except GroupMissing:
                pass
            except TransportError as exc:
                log.warning("lease renewal failed: %s", exc)

    async def renew_leases(self, older_than_ms: int) -> None:
        """Reset the idle time of held entries leased longer than ``older_than_ms`` ago."""
        now = now_ms()
        due = [d for d in self.held.values() if now - d.leased_ms >= older_than_ms]
        spec = self.spec
        for start in range(0, len(due), 500):
            chunk = due[start:start + 500]
            lost = set(await self._transport.renew(spec.keys.stream, spec.group, spec.consumer,
                                                   [d.entry.id for d in chunk]))
            for delivery in chunk:
                if delivery.entry.id in lost:
                    self.mark_lost(delivery)
                else:
                    delivery.leased_ms = now
                    self.stats.leases_renewed += 1

    def mark_lost(self, delivery: Delivery) -> None:
        """Another consumer owns ``delivery`` now: forget it; its handler is told."""
        delivery.lost = True
        self.held.pop(delivery.entry.id, None)
        self.stats.leases_lost += 1
        log.warning("lease lost: another consumer owns this entry now",
                    extra=log_ids(self.spec, delivery))
