"""Group consumer: workers taking turns to XREADGROUP -> handlers -> batched acks.

It never reads more entries than it has free handler slots, renews the lease of entries whose
handlers run long, retries failures with backoff (Redis's delivery counter decides when to give
up), dead-letters poison and exhausted entries atomically with their ack, recreates a vanished
group, and on stop drains, acks, and hands back what did not finish.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc

from . import codec, policy
from .claimer import Claimer
from .config import DeliveryConfig
from .deadletter import REASON_FAILED, REASON_POISON, REASON_REJECTED, record_fields
from .dedup import split_duplicates
from .delivery import ConsumerStats, Delivery, EntryHandler, StreamSpec, log_ids
from .envelope import Envelope
from .errors import CodecError, GroupMissing, TransportError
from .ledger import Ledger
from .registry import now_ms
from .signals import Reject, Retry
from .slots import Slots
from .soon import NextPass
from .transport import Entry, StreamTransport

log = logging.getLogger(__name__)

AliveCheck = Callable[[Sequence[str]], Awaitable[list[bool]]]


class GroupConsumer:
    """Consumes one stream as one consumer of one group.

    :param alive: tells which consumers (node ids) still have a heartbeat; enables the
        immediate takeover of a dead node's entries
    :param decode: entry fields -> envelope (raising CodecError for poison); the events
        stream passes its own
    """

    def __init__(self, transport: StreamTransport, spec: StreamSpec, handler: EntryHandler,
                 config: DeliveryConfig, alive: AliveCheck | None = None, *,
                 decode: Callable[[dict[bytes, bytes] | None], Envelope] = codec.decode_envelope
                 ) -> None:
        self.spec = spec
        self._decode = decode
        self.stats = ConsumerStats()
        self._transport = transport
        self._handler = handler
        self._config = config
        self._slots = Slots(config.concurrency)
        # When every slot is busy, read again once a quarter is free, not after each handler.
        self._read_batch_min = max(1, config.concurrency // 4)
        self._ledger = Ledger(transport, spec, config, self.stats)
        self._inflight = self._ledger.held
        self._stopping = False
        self._stopped = anyio.Event()
        # Deliveries waiting for a worker, and the events of workers waiting for work. A plain
        # deque: a memory object stream costs an event-loop pass and allocations per item.
        self._queue: deque[Delivery] = deque()
        self._idle_workers: deque[anyio.Event] = deque()
        self._waking = False
        self._handling = 0  # handlers running
        # Reading is a turn that one idle worker at a time takes, rather than a task of its
        # own: the worker whose read returns runs the first handler itself, in the same pass
        # of the event loop. Handing each entry to another task cost a pass per message.
        self._reading = False
        self._read_scope: anyio.CancelScope | None = None
        self._history: bytes | None = b"0-0"  # first re-read our own pending entries
        self._read_failures = 0
        self._want_help = NextPass(self._help)
        self._read_next = False  # the next worker woken reads before taking queued entries
        self._tg: anyio.abc.TaskGroup | None = None
        self._claimer = Claimer(transport, spec, config, self, alive, self.stats)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Consume until :meth:`stop` is called or the task is cancelled."""
        for attempt in range(20):  # Redis may refuse writes for a moment (OOM, LOADING)
            try:
                await self._ensure_group()
                break
            except TransportError as exc:
                if attempt == 19:
                    raise
                log.warning("cannot create the group yet (%s); retrying", exc,
                            extra={"stream": self.spec.keys.stream})
                await anyio.sleep(0.5)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # One worker more than handler slots: one can read while all slots run handlers.
            for _ in range(self._config.concurrency + 1):
                tg.start_soon(self._work)
            tg.start_soon(self._ledger.ack_loop)
            tg.start_soon(self._ledger.renew_loop)
            tg.start_soon(self._claimer.run)
            task_status.started()
            try:
                await self._stopped.wait()
            finally:
                # Also when cancelled from outside: what we hold is acked or handed back.
                with anyio.CancelScope(shield=True):
                    await self._shutdown(tg)

    def stop(self) -> None:
        """Stop reading; in-flight handlers get ``grace_ms`` to finish (graceful stop)."""
        self._stopping = True
        self._stopped.set()
        if self._read_scope is not None:
            self._read_scope.cancel()

    @property
    def in_flight(self) -> int:
        """Entries this consumer holds (running, waiting to be acked, or waiting to retry)."""
        return len(self._inflight)

    async def _shutdown(self, tg: anyio.abc.TaskGroup) -> None:
        self._claimer.stop()
        if not tg.cancel_scope.cancel_called:  # cancelled handlers need no grace period
            with anyio.move_on_after(self._config.grace_ms / 1000):
                await self._slots.wait_idle()
        tg.cancel_scope.cancel()
        with anyio.move_on_after(5):
            try:
                await self._ledger.flush_acks()
            except TransportError as exc:
                log.warning("final acks failed (%s): those entries are handed back", exc)
            await self._hand_back()

    async def _hand_back(self) -> None:
        """Back-date what did not finish so a peer takes it at once; drop the consumer if empty.

        Only entries this consumer still owns are back-dated: one a peer took over stays its.
        """
        spec = self.spec
        left = list(self._inflight)
        try:
            if left:
                idle = max(self._config.claim_idle_ms, self._config.heartbeat_ttl_ms) + 1000
                await self._transport.release(spec.keys.stream, spec.group, spec.consumer, left,
                                              idle)
                log.info("handed back %d unfinished entries", len(left),
                         extra={"stream": spec.keys.stream, "consumer": spec.consumer})
            else:
                await self._transport.delete_idle_consumer(spec.keys.stream, spec.group,
                                                           spec.consumer)
        except TransportError as exc:
            log.warning("could not hand back entries on stop: %s", exc)

    async def _ensure_group(self) -> None:
        await self._transport.ensure_group(self.spec.keys.stream, self.spec.group)

    # -- reading ----------------------------------------------------------------------------
    async def _read_turn(self, scope: anyio.CancelScope) -> None:
        """Read once, as the one worker whose turn it is, and queue what came. :meth:`stop`
        cancels ``scope``, the worker's, while the read is under way."""
        self._reading = True
        self._read_scope = scope
        try:
            read = await self._read()
        finally:
            self._reading = False
            self._read_scope = None
        if read is not None:
            await self._admit(*read)  # no worker woken: this one handles the first entry (_work)

    async def _read(self) -> tuple[list[Entry], dict[bytes, int] | None] | None:
        """One XREADGROUP: after a start our own pending entries, then new ones. Returns the
        entries (their slots taken) and their delivery counts, or None for nothing to do."""
        spec, slots, history = self.spec, self._slots, self._history
        await slots.wait_free(self._read_batch_min)
        try:
            entries = await self._transport.read_group(
                spec.keys.stream, spec.group, spec.consumer, slots.free,
                self._config.block_ms, history)
            counts = None
            last = entries[-1].id if entries else None
            if history is not None and entries:
                # Re-reading history is idempotent, so a failure here just reads it again.
                entries = await self._drop_deleted(entries)
                counts = await self._counts_of(entries) if entries else None
        except GroupMissing:
            log.warning("group vanished; recreating it",
                        extra={"stream": spec.keys.stream, "group": spec.group})
            await self._recreate_group()
            self._history = None
            return None
        except TransportError as exc:  # ConnectionLost, LOADING, OOM...: wait and retry
            self._read_failures += 1
            log.warning("read failed (%s); retrying", exc, extra={"stream": spec.keys.stream})
            await anyio.sleep(min(5.0, 0.05 * 2 ** self._read_failures))
            return None
        self._read_failures = 0
        # Not reserved before the read: a reservation held through a blocking read would
        # starve retries and the claimer. Claims landing meanwhile may overfill by one batch.
        slots.take(len(entries))
        if history is not None:
            self._history = last  # None once our pending list is read through
        return (entries, counts) if entries else None

    async def _drop_deleted(self, entries: list[Entry]) -> list[Entry]:
        """Ack pending entries whose stream entry is gone (XDEL): nothing is left to handle."""
        gone = [e.id for e in entries if e.fields is None]
        if not gone:
            return entries
        await self._transport.ack(self.spec.keys.stream, self.spec.group, gone)
        log.info("acked %d entries deleted while pending", len(gone),
                 extra={"stream": self.spec.keys.stream})
        return [e for e in entries if e.fields is not None]

    async def _recreate_group(self) -> None:
        try:
            await self._ensure_group()
        except TransportError:
            await anyio.sleep(0.5)
        # Whatever we held belonged to the vanished group; acking it is meaningless now.
        for delivery in self._inflight.values():
            delivery.lost = True
        self._inflight.clear()

    async def _counts_of(self, entries: list[Entry]) -> dict[bytes, int]:
        pending = await self._transport.pending(
            self.spec.keys.stream, self.spec.group, len(entries) + len(self._inflight),
            self.spec.consumer, entries[0].id, entries[-1].id)
        return {p.id: p.deliveries for p in pending}

    # -- the sink the claimer feeds ---------------------------------------------------------
    def reserve(self, wanted: int, priority: bool = False) -> int:
        """Reserve up to ``wanted`` free slots; returns how many were reserved.

        ``priority`` reserves even when all slots are busy (up to one full set more): work
        orphaned by a dead node must not wait behind the whole backlog. The workers stay at
        ``concurrency``; the extra entries queue ahead of later reads.
        """
        free = self._slots.free
        if priority:
            free = max(free, self._slots.total + free)
        n = max(0, min(wanted, free))
        self._slots.take(n)
        return n

    def unreserve(self, n: int) -> None:
        """Give back reserved slots that were not used."""
        if n:
            self._slots.release(n)

    def holds(self, entry_id: bytes) -> bool:
        """Whether this consumer already works on ``entry_id``."""
        return entry_id in self._inflight

    async def wait_for_room(self) -> None:
        """Return once a read's worth of slots is free (the claimer's next batch fits)."""
        await self._slots.wait_free(self._read_batch_min)

    async def accept(self, entries: list[Entry], counts: dict[bytes, int] | None) -> None:
        """Hand entries to the workers; one reserved slot per entry is consumed."""
        if await self._admit(entries, counts):
            self._wake_worker()

    async def _admit(self, entries: list[Entry], counts: dict[bytes, int] | None) -> int:
        """Queue entries for the workers (without waking one); returns how many."""
        now = now_ms()
        batch: list[Delivery] = []
        for entry in entries:
            if entry.id in self._inflight:
                self._slots.release()
                continue
            try:
                envelope = self._decode(entry.fields)
                error = None
            except CodecError as exc:
                envelope, error = None, exc
            deliveries = counts.get(entry.id, 1) if counts is not None else 1
            batch.append(Delivery(entry, envelope, deliveries, now, error))
        if self._config.dedup_window_ms and batch:
            try:
                batch = await self._skip_duplicates(batch, now)
            except TransportError as exc:
                # Still pending for us: the idle claimer hands them back later.
                log.warning("dedup check failed (%s); leaving %d entries pending", exc,
                            len(batch), extra={"stream": self.spec.keys.stream})
                self._slots.release(len(batch))
                return 0
        inflight = self._inflight
        for delivery in batch:
            inflight[delivery.entry.id] = delivery
        self._queue.extend(batch)
        self.stats.delivered += len(batch)
        return len(batch)

    async def _skip_duplicates(self, batch: list[Delivery], now: int) -> list[Delivery]:
        kept, duplicates = await split_duplicates(self._transport, self.spec.keys.dedup, batch,
                                                  self._inflight.values(), now)
        for delivery in duplicates:  # acked unhandled
            self.stats.duplicates += 1
            self._inflight[delivery.entry.id] = delivery
            self._ledger.queue_ack(delivery)
            self._slots.release()
        return kept

    # -- handling ---------------------------------------------------------------------------
    def _wake_worker(self) -> None:
        # At most one worker is being woken at a time: a fast handler lets the running worker
        # drain the queue alone; a handler that suspends lets the woken one take the next item,
        # which wakes another, so concurrency ramps up only when handlers actually wait.
        if not self._waking and self._idle_workers:
            self._waking = True
            self._idle_workers.popleft().set()

    def _wake_reader(self) -> None:
        if not self._reading and not self._stopping:
            self._read_next = True
            self._wake_worker()

    def _help(self) -> None:
        """In the pass after a handler started (it waited, or a batch is handled): a worker
        for what is still queued, else one to read."""
        if self._queue and self._handling < self._config.concurrency:
            self._wake_worker()
        else:
            self._wake_reader()

    async def _work(self) -> None:
        queue, idle, most = self._queue, self._idle_workers, self._config.concurrency
        while True:
            # One cancel scope per stretch of work, not per read (~5 us each): stop() cancels
            # it only while this worker waits on a read, never while it runs a handler.
            with anyio.CancelScope() as scope:
                while True:
                    may_read = not self._reading and not self._stopping
                    if queue and self._handling < most and not (may_read and self._read_next):
                        await self._handle_next()
                    elif may_read:
                        if self._read_next:  # woken to read: another takes the queue meanwhile
                            self._read_next = False
                            if queue:
                                self._wake_worker()
                        await self._read_turn(scope)
                    else:
                        break
            if queue and self._handling < most:
                continue  # its read was cancelled by stop(): what is queued still runs
            wake = anyio.Event()
            idle.append(wake)
            await wake.wait()
            self._waking = False

    async def _handle_next(self) -> None:
        queue = self._queue
        delivery = queue.popleft()
        if queue and self._handling:  # others wait in handlers: so may this one
            self._wake_worker()  # the next entry starts at once (a handler more per pass)
        # Should this handler wait, the next pass wakes a worker for the queue or to read. One
        # that does not is done by then: no worker woken to find nothing (~30 us per read).
        self._want_help()
        self._handling += 1
        try:
            await self._process(delivery)
        finally:
            self._handling -= 1
            self._slots.release()

    async def _process(self, delivery: Delivery) -> None:
        if delivery.envelope is None:
            self.stats.poison += 1
            await self._dead_letter(delivery, REASON_POISON, delivery.error)
            return
        try:
            await self._handler(delivery)
        except Retry as signal:
            delay = None if signal.delay_s is None else int(signal.delay_s * 1000)
            self._schedule_retry(delivery, delay)
        except Reject as signal:
            await self._dead_letter(delivery, REASON_REJECTED, signal)
        except Exception as exc:
            if delivery.lost:
                return  # the new owner decides; our outcome no longer counts
            if policy.should_dead_letter(delivery.deliveries, self._config.max_deliveries):
                await self._dead_letter(delivery, REASON_FAILED, exc)
            else:
                log.warning("handler failed (delivery %d of %d): %s: %s", delivery.deliveries,
                            self._config.max_deliveries, type(exc).__name__, exc,
                            extra=log_ids(self.spec, delivery))
                self._schedule_retry(delivery, None)
        else:
            self._ledger.queue_ack(delivery)

    async def _dead_letter(self, delivery: Delivery, reason: str,
                           exc: BaseException | None) -> None:
        spec = self.spec
        fields = record_fields(
            reason=reason, source=delivery.entry, stream=spec.keys.stream, group=spec.group,
            consumer=spec.consumer, deliveries=delivery.deliveries, failed_ms=now_ms(), exc=exc,
            message_id=delivery.envelope.id if delivery.envelope else None)
        try:
            dead_id = await self._transport.dead_letter(
                spec.keys.stream, spec.keys.dead_letters, spec.group, spec.consumer,
                delivery.entry.id, fields)
        except TransportError as exc2:
            # Left pending: the idle claimer brings it back and we try again.
            log.warning("dead-lettering failed: %s", exc2, extra=log_ids(self.spec, delivery))
            self._inflight.pop(delivery.entry.id, None)
            return
        self._inflight.pop(delivery.entry.id, None)
        if dead_id is None:
            self._ledger.mark_lost(delivery)
            return
        self.stats.dead_lettered += 1
        log.error("dead-lettered (%s) after %d deliveries: %s", reason, delivery.deliveries,
                  f"{type(exc).__name__}: {exc}" if exc else "", extra=log_ids(self.spec, delivery))

    def _schedule_retry(self, delivery: Delivery, delay_ms: int | None) -> None:
        if delay_ms is None:
            delay_ms = policy.retry_delay_ms(delivery.deliveries, self._config.backoff_base_ms,
                                             self._config.backoff_max_ms)
        self.stats.retried += 1
        assert self._tg is not None
        self._tg.start_soon(self._retry_later, delivery, delay_ms)

    async def _retry_later(self, delivery: Delivery, delay_ms: int) -> None:
        """Wait out the backoff (the lease stays renewed), then claim it again (counter + 1)."""
        await anyio.sleep(delay_ms / 1000)
        if delivery.lost or self._stopping:
            return
        # Retries take their slot even when all are busy: they were admitted once already.
        self._slots.take()
        spec = self.spec
        try:
            # Only while still ours: a peer may have taken it over during the backoff.
            entries = await self._transport.claim_owned(spec.keys.stream, spec.group,
                                                        spec.consumer, [delivery.entry.id])
        except TransportError:
            entries = []
        if not entries:  # taken over, gone (trimmed, redriven, group recreated), unreachable
            self._inflight.pop(delivery.entry.id, None)
            self._slots.release()
            return
        self._inflight.pop(delivery.entry.id, None)
        await self.accept(entries, {delivery.entry.id: delivery.deliveries + 1})

    async def renew_leases(self, older_than_ms: int) -> None:
        """Reset the idle time of held entries leased longer than ``older_than_ms`` ago."""
        await self._ledger.renew_leases(older_than_ms)
