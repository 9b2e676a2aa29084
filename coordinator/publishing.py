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

from .transport import StreamTransport

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
        self._closed = False
        self._done = anyio.Event()
        self._running = False

    @property
    def buffered(self) -> int:
        """Items waiting to be written."""
        return len(self._buffer)

    def _offer(self, item: Item) -> bool:
        """Queue one item; False (and counted as dropped) when full or closed."""
        if self._closed or len(self._buffer) >= self._capacity:
            self.dropped += 1
            return False
        self._buffer.append(item)
        if not self._wanted.is_set():
            self._wanted.set()
        return True

    async def _wait_for_space(self) -> None:
        """Return once an item would be accepted (or the buffer is closed)."""
        while len(self._buffer) >= self._capacity and not self._closed:
            await self._space.wait()

    async def run(self, transport: StreamTransport, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued items until :meth:`close` (then drain) or cancellation."""
        self._running = True
        task_status.started()
        buffer = self._buffer
        try:
            while True:
                if not buffer:
                    if self._closed:
                        return
                    await self._wanted.wait()
                    self._wanted = anyio.Event()
                    continue
                batch = [buffer.popleft() for _ in range(min(len(buffer), self._batch_size))]
                self._space.set()
                self._space = anyio.Event()
                await self._write(transport, batch)
        finally:
            self._done.set()

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
