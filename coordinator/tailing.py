"""Reading a stream from a position on, optionally following it (a plain XREAD tail, no
consumer group): the shared loop under events, tokens and topic tails."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .transport import Entry, StreamTransport


async def last_id(transport: StreamTransport, stream: str) -> bytes:
    """The id of the newest entry of ``stream`` (``0-0`` when it is empty or missing)."""
    last = await transport.range(stream, b"-", b"+", count=1, reverse=True)
    return last[0].id if last else b"0-0"


async def tail(transport: StreamTransport, stream: str, *, after: bytes | None, follow: bool,
               block_ms: int, count: int) -> AsyncIterator[Entry]:
    """Entries of ``stream`` after the id ``after`` (None: only new ones); without ``follow``
    it ends at the current end of the stream, else it waits for more, ``block_ms`` a read."""
    if after is None:
        after = await last_id(transport, stream)
        if not follow:
            return
    while True:
        entries = await transport.read(stream, after, count, block_ms if follow else None)
        if not entries and not follow:
            return
        for entry in entries:
            after = entry.id
            yield entry
