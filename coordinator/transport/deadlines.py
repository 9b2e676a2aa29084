"""Time limits of in-flight Redis exchanges, enforced by one periodic check."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any


class Deadlines:
    """Cancels the task of an exchange that outlived its time limit; one timer serves all.

    An ``asyncio.timeout`` per command cost ~7 us to enter and leave, and its timer went on
    and off the event loop's heap: ~10 us of a 110-130 us round trip (measured on the
    benchmark machine). Here starting and ending a watch are dict writes, and the check runs
    every quarter of the limit (at most every second) while something is watched: a limit
    fires up to that much late.

    :param limit_s: how long an exchange may take, beyond the time it asked the server to
        hold its reply (a blocking read)
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._every_s = min(1.0, limit_s / 4)
        # key -> (task, when its time is up, its cancellation requests when the watch began)
        self._watched: dict[Hashable, tuple[asyncio.Task[Any], float, int]] = {}
        self._expired: set[Hashable] = set()
        self._check_handle: asyncio.TimerHandle | None = None

    def start(self, key: Hashable, held_s: float = 0.0) -> None:
        """Watch the running task's exchange on ``key`` (one exchange per key at a time);
        ``held_s``: how long the server may hold the reply on purpose."""
        task = asyncio.current_task()
        assert task is not None, "an exchange runs in a task"
        loop = task.get_loop()
        self._watched[key] = (task, loop.time() + self.limit_s + held_s, task.cancelling())
        if self._check_handle is None:
            self._check_handle = loop.call_later(self._every_s, self._check)

    def end(self, key: Hashable) -> None:
        """Stop watching ``key``, whose exchange is done."""
        self.failure(key, None)

    def failure(self, key: Hashable, exc: BaseException | None) -> BaseException | None:
        """Stop watching ``key`` after ``exc`` ended its exchange; returns what to raise: a
        ``TimeoutError`` for the cancellation this made (taken back), else ``exc``."""
        task, _, cancelling = self._watched.pop(key, (None, 0.0, 0))
        if key not in self._expired:
            return exc
        self._expired.discard(key)
        if task is None:
            return exc
        # As asyncio.timeout: a timeout only if nobody else asked to cancel the task since.
        if task.uncancel() <= cancelling and isinstance(exc, asyncio.CancelledError):
            return TimeoutError()
        return exc

    def _check(self) -> None:
        self._check_handle = None
        if not self._watched:
            return  # restarted by the next watch
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, (task, due, _) in self._watched.items():
            if due <= now and key not in self._expired:
                self._expired.add(key)
                task.cancel()
        self._check_handle = loop.call_later(self._every_s, self._check)
