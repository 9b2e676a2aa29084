"""Coalesces concurrent appends into one round trip.

Many tasks calling ``send`` (or ``send_many``) at once would each pay a full round trip and
redis-py's per-command overhead. Here the first caller becomes the leader and writes every
append queued so far in one packed batch; callers arriving meanwhile wait and are written by
the next leader (the first of them). A lone caller is written at once, so nothing waits for a
timer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

Outcome = bytes | BaseException  # the new entry id, or why that entry was not appended


class _Pending:
    __slots__ = ("stream", "datas", "done", "outcomes", "lead")

    def __init__(self, stream: str, datas: Sequence[bytes]) -> None:
        self.stream = stream
        self.datas = datas
        self.done = anyio.Event()
        self.outcomes: list[Outcome] = []
        self.lead = False


Writer = Callable[[Sequence[tuple[str, bytes]]], Awaitable[list[Outcome]]]


class AppendBatcher:
    """Batches the appends of concurrent tasks.

    :param write: writes ``(stream, data)`` pairs in one round trip and returns, per pair, the
        new id or the error for that pair; raising means the whole batch failed
    :param max_batch: most entries per round trip (one caller's entries are never split)
    """

    def __init__(self, write: Writer, max_batch: int = 1000) -> None:
        self._write = write
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._busy = False

    async def append(self, stream: str, data: bytes) -> bytes:
        """Append one entry; returns its stream id."""
        outcome = (await self.append_many(stream, [data]))[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def append_many(self, stream: str, datas: Sequence[bytes]) -> list[Outcome]:
        """Append entries to one stream, in order; per entry its id or its error."""
        if not datas:
            return []
        if not self._busy:  # alone: written at once, with nothing to queue or wake
            self._busy = True
            try:
                with anyio.CancelScope(shield=True):  # as a leader's write (see _flush)
                    return await self._outcomes([(stream, data) for data in datas])
            finally:
                self._hand_over()
        pending = _Pending(stream, datas)
        self._queue.append(pending)
        try:
            await pending.done.wait()
        except BaseException:
            if pending.lead:  # chosen as leader, then cancelled: still lead, shielded
                with anyio.CancelScope(shield=True):
                    await self._lead(pending)
            raise  # a cancelled follower's entries are still written by the next leader
        if pending.lead:
            await self._lead(pending)
        return pending.outcomes

    async def _outcomes(self, items: list[tuple[str, bytes]]) -> list[Outcome]:
        try:
            return await self._write(items)
        except BaseException as exc:  # reported for each entry, raised by each caller
            return [exc] * len(items)

    async def _lead(self, pending: _Pending) -> None:
        try:
            while not pending.done.is_set() or pending.lead:
                pending.lead = False
                await self._flush()
        finally:
            self._hand_over()

    async def _flush(self) -> None:
        taken, entries = 0, 0
        for queued in self._queue:
            if taken and entries + len(queued.datas) > self._max_batch:
                break
            taken += 1
            entries += len(queued.datas)
        batch = self._queue[:taken]
        del self._queue[:taken]
        # Shielded: once written, every caller in the batch must learn its outcome even if
        # the leader is cancelled meanwhile.
        with anyio.CancelScope(shield=True):
            outcomes = await self._outcomes(
                [(p.stream, data) for p in batch for data in p.datas])
        start = 0
        for pending in batch:
            pending.outcomes = outcomes[start:start + len(pending.datas)]
            start += len(pending.datas)
            pending.done.set()

    def _hand_over(self) -> None:
        if self._queue:
            nxt = self._queue[0]
            nxt.lead = True
            nxt.done.set()  # wakes it as the next leader
        else:
            self._busy = False
