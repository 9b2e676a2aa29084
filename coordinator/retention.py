"""Retention: trims streams by MINID computed from group progress and age, never MAXLEN."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio

from .errors import TransportError
from .policy import GroupProgress, format_id, trim_floor
from .registry import now_ms
from .transport import StreamTransport

log = logging.getLogger(__name__)


async def trim_stream(transport: StreamTransport, stream: str, retention_ms: int,
                      now: int | None = None, *, by_age_alone: bool = False) -> int:
    """Trim entries every group acknowledged and older than ``retention_ms``.

    :param by_age_alone: a stream without groups is trimmed by age (the events stream: its
        tail readers need no group); else it is kept whole for the groups to come
    :returns: how many entries were removed
    """
    progress = []
    for group in await transport.groups(stream):
        oldest = None
        if group.pending:
            first = await transport.pending(stream, group.name, 1)
            oldest = first[0].id if first else None
        progress.append(GroupProgress(oldest, group.last_delivered))
    now = now_ms() if now is None else now
    if not progress and by_age_alone:
        progress.append(GroupProgress(None, format_id(now, 0)))  # acknowledged up to now
    floor = trim_floor(progress, now, retention_ms)
    if floor is None:
        return 0
    return await transport.trim_min_id(stream, floor)


class Retention:
    """Trims a changing set of streams on an interval."""

    def __init__(self, transport: StreamTransport, streams: Callable[[], Sequence[str]],
                 retention_ms: int, interval_ms: int, *, by_age_alone: bool = False) -> None:
        self._transport = transport
        self._by_age_alone = by_age_alone
        self._streams = streams
        self._retention_ms = retention_ms
        self._interval_s = interval_ms / 1000

    async def run(self) -> None:
        """Trim every interval until cancelled."""
        while True:
            await anyio.sleep(self._interval_s)
            for stream in self._streams():
                try:
                    removed = await trim_stream(self._transport, stream, self._retention_ms,
                                                by_age_alone=self._by_age_alone)
                except TransportError as exc:
                    log.warning("retention of %s failed: %s", stream, exc)
                    continue
                if removed:
                    log.debug("trimmed %d entries from %s", removed, stream)
