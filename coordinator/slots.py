"""Handler slots: how many entries a consumer may hold at once (its backpressure)."""

from __future__ import annotations

import anyio


class Slots:
    """A counter of busy handler slots that readers can wait on.

    Cheaper than a semaphore on the hot path: releasing touches an Event only when somebody
    waits and the slots they wait for are free (not on every release).
    """

    __slots__ = ("total", "used", "_freed", "_wake_at")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = anyio.Event()
        # Wake waiters once ``used`` drops to this (-1: nobody waits).
        self._wake_at = -1

    @property
    def free(self) -> int:
        """Slots not in use."""
        return self.total - self.used

    def take(self, n: int = 1) -> None:
        """Mark ``n`` slots busy (the caller checked :attr:`free` first)."""
        self.used += n

    def release(self, n: int = 1) -> None:
        """Mark ``n`` slots free and wake the waiters whose slots are now free."""
        self.used -= n
        if self.used <= self._wake_at:
            self._wake_at = -1
            self._freed.set()
            self._freed = anyio.Event()

    async def _wait_until_used_at_most(self, used: int) -> None:
        while self.used > used:
            self._wake_at = max(self._wake_at, used)
            await self._freed.wait()

    async def wait_free(self, at_least: int = 1) -> None:
        """Return once at least ``at_least`` slots are free (waiting for several at once
        makes for fewer, larger reads when handlers are fast)."""
        await self._wait_until_used_at_most(self.total - min(max(at_least, 1), self.total))

    async def wait_idle(self) -> None:
        """Return once no slot is in use."""
        await self._wait_until_used_at_most(0)
