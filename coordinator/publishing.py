"""Publishers backed by a bounded buffer of items written in batches by one task.

Publishing lifecycle events and tokens sits on every handler's path, so it must never block or
fail the agent's work: items are queued (a deque and one wake-up event, not a memory object
stream, which costs allocations and a loop pass per item) and dropped, counted, when the
buffer is full or closed. Each publisher decides what an item is and how a batch is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Generic, TypeVar

import anyio
import anyio.abc

from .soon import NextPass
from .transport import AppendWrite, Piggyback, StreamTransport

Item = TypeVar("Item")


class BufferedPublisher(ABC, Generic[Item]):
    """Queued items, drained in batches by :meth:`run`; subclasses say how a batch is
    written (:meth:`_write`, which counts ``published`` and ``failed``) and what they queue.

    :param enabled: False publishes nothing
    :param capacity: items queued at most; beyond that :meth:`_offer` drops
    :param batch_size: items handed to :meth:`_write` at once at most
    :param timeout_ms: give up on one write after this long
    """

    def __init__(self, *, enabled: bool, capacity: int, batch_size: int,
                 timeout_ms: int) -> None:
        self.enabled = enabled
        self.published = 0
        self.failed = 0
        self.dropped = 0
        self._timeout_s = timeout_ms / 1000
        self._capacity = capacity
        self._batch_size = batch_size
        self._buffer: deque[Item] = deque()
        self._wanted = anyio.Event()
        self._space = anyio.Event()
        self._space_wanted = False
        self._closed = False
        self._done = anyio.Event()
        self._running = False
        # Not at once: the read sent next in this pass of the loop may carry the batch (see
        # _piggyback); the writer is woken only for what is still queued after it.
        self._wake_soon = NextPass(self._wake)
        # A batch sent along with a read: later batches wait for it, to stay in order.
        self._riding = False
        self._landed: anyio.Event | None = None
        self._writing = False

    @property
    def buffered(self) -> int:
        """Items waiting to be written."""
        return len(self._buffer)

    def _offer(self, item: Item) -> bool:
        """Queue one item; False (and counted as dropped) when full or closed."""
        buffer = self._buffer
        if self._closed or len(buffer) >= self._capacity:
            self.dropped += 1
            return False
        buffer.append(item)
        if len(buffer) == 1:
            # Only when it was empty: a wake-up is due already, or the writer is busy and
            # looks at the buffer again before it waits.
            self._wake_soon()
        return True

    def _wake(self) -> None:
        if self._buffer and not self._wanted.is_set():
            self._wanted.set()

    def _take_batch(self) -> list[Item]:
        buffer = self._buffer
        batch = [buffer.popleft() for _ in range(min(len(buffer), self._batch_size))]
        if self._space_wanted:  # an event costs ~2.5 us to make: not for every batch
            self._space_wanted = False
            self._space.set()
            self._space = anyio.Event()
        return batch

    async def _wait_for_space(self) -> None:
        """Return once an item would be accepted (or the buffer is closed)."""
        while len(self._buffer) >= self._capacity and not self._closed:
            self._space_wanted = True
            await self._space.wait()

    async def run(self, transport: StreamTransport, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued items until :meth:`close` (then drain) or cancellation."""
        self._running = True
        stop_piggyback = transport.piggyback(self._piggyback) if self._rides else None
        task_status.started()
        buffer = self._buffer
        try:
            while True:
                if self._riding:
                    self._landed = anyio.Event()
                    await self._landed.wait()
                    continue
                if not buffer:
                    if self._closed:
                        return
                    await self._wanted.wait()
                    self._wanted = anyio.Event()
                    continue
                self._writing = True
                try:
                    await self._write(transport, self._take_batch())
                finally:
                    self._writing = False
        finally:
            if stop_piggyback is not None:
                stop_piggyback()
            self._done.set()

    def _piggyback(self) -> Piggyback | None:
        """A batch to send along with a read, when the writer is idle (order is kept)."""
        if not self._buffer or self._writing or self._riding:
            return None
        batch = self._take_batch()
        write, count = self._ride(batch), len(batch)
        self._riding = True

        def done(error: BaseException | None) -> None:
            self._riding = False
            if error is None:
                self.published += count
            elif self._done.is_set():  # the writer is gone: nobody would try again
                self.failed += count
            else:  # the writer tries again, with its retries and time limit
                self._buffer.extendleft(reversed(batch))
                self._wanted.set()
            if self._landed is not None:
                self._landed.set()
                self._landed = None

        return Piggyback(write, done)

    #: Whether batches may ride along with reads (:meth:`_ride` says how).
    _rides = False

    def _ride(self, batch: list[Item]) -> AppendWrite:
        """``batch`` as one append to send with a read (only called when :attr:`_rides` is
        set; items that cannot be written are refused when offered, not here)."""
        raise NotImplementedError

    @abstractmethod
    async def _write(self, transport: StreamTransport, batch: list[Item]) -> None:
        """Write one batch, oldest first; count ``published`` and ``failed``."""

    async def close(self, timeout_s: float | None = None) -> None:
        """Accept nothing more and wait (up to ``timeout_s``, default the write timeout)
        until the buffer is written."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        self._closed = True
        self._wanted.set()
        self._space.set()
        if not self._running:
            return
        with anyio.move_on_after(timeout_s):
            await self._done.wait()
