"""Coalesces concurrent single appends into one round trip.

Many tasks calling ``send`` at once would each pay a full round trip and redis-py's per-command
overhead. Here the first caller becomes the leader and writes every append queued so far in one
packed batch; callers arriving meanwhile wait and are written by the next leader (the first of
them). A lone caller is written at once, so nothing waits for a timer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio


class _Pending:
    __slots__ = ("stream", "data", "done", "result", "error", "lead")

    def __init__(self, stream: str, data: bytes) -> None:
        self.stream = stream
        self.data = data
        self.done = anyio.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.lead = False


Writer = Callable[[Sequence[tuple[str, bytes]]], Awaitable[list[bytes | BaseException]]]


class AppendBatcher:
    """Batches ``append(stream, data)`` calls of concurrent tasks.

    :param write: writes ``(stream, data)`` pairs in one round trip and returns, per pair, the
        new id or the error for that pair; raising means the whole batch failed
    :param max_batch: most appends per round trip
    """

    def __init__(self, write: Writer, max_batch: int = 1000) -> None:
        self._write = write
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._busy = False

    async def append(self, stream: str, data: bytes) -> bytes:
        """Append one entry; returns its stream id."""
        if not self._busy:  # alone: written at once, with nothing to queue or wake
            self._busy = True
            try:
                with anyio.CancelScope(shield=True):  # as a leader's write (see _flush)
                    result = (await self._write([(stream, data)]))[0]
            finally:
                self._hand_over()
            if isinstance(result, BaseException):
                raise result
            return result
        pending = _Pending(stream, data)
        self._queue.append(pending)
        try:
            await pending.done.wait()
        except BaseException:
            if pending.lead:  # chosen as leader, then cancelled: still lead, shielded
                with anyio.CancelScope(shield=True):
                    await self._lead(pending)
            raise  # a cancelled follower's entry is still written by the next leader
        if pending.lead:
            await self._lead(pending)
        return self._outcome(pending)

    async def _lead(self, pending: _Pending) -> None:
        try:
            while not pending.done.is_set() or pending.lead:
                pending.lead = False
                await self._flush()
        finally:
            self._hand_over()

    @staticmethod
    def _outcome(pending: _Pending) -> bytes:
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _flush(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: len(batch)]
        # Shielded: once written, every caller in the batch must learn its outcome even if
        # the leader is cancelled meanwhile.
        with anyio.CancelScope(shield=True):
            try:
                results = await self._write([(p.stream, p.data) for p in batch])
            except BaseException as exc:  # reported to each caller, re-raised by each
                results = [exc] * len(batch)
        for pending, result in zip(batch, results):
            if isinstance(result, BaseException):
                pending.error = result
            else:
                pending.result = result
            pending.done.set()

    def _hand_over(self) -> None:
        if self._queue:
            nxt = self._queue[0]
            nxt.lead = True
            nxt.done.set()  # wakes it as the next leader
        else:
            self._busy = False
