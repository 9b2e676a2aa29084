"""Request/reply: each node reads its own reply stream and wakes the waiting caller.

Replies travel over a stream (not Pub/Sub) so one sent while the caller's connection blips is
not lost; entries are deleted once read.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from . import codec
from .envelope import Reply
from .errors import CodecError, TransportError
from .transport import StreamTransport

log = logging.getLogger(__name__)

#: Time to live of a reply stream, refreshed by every reply and, while its node reads it, by
#: the node itself: the stream of a requester that crashed disappears on its own.
REPLY_STREAM_TTL_MS = 10 * 60 * 1000


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None


class ReplyRouter:
    """Owns one node's reply stream and the callers waiting on it."""

    def __init__(self, transport: StreamTransport, stream: str, *,
                 ttl_ms: int = REPLY_STREAM_TTL_MS) -> None:
        self.stream = stream
        self.ttl_ms = ttl_ms
        self._transport = transport
        self._waiters: dict[str, _Waiter] = {}
        self._refresh_at = 0.0  # monotonic time of the next refresh of the stream's TTL

    def expect(self, correlation_id: str) -> _Waiter:
        """Register interest in a reply before the request is sent (no race)."""
        waiter = _Waiter()
        self._waiters[correlation_id] = waiter
        return waiter

    def forget(self, correlation_id: str) -> None:
        """Stop waiting (timeout or cancellation); a late reply is then dropped."""
        self._waiters.pop(correlation_id, None)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Read replies until cancelled; deletes the stream on the way out."""
        last = b"0-0"
        task_status.started()
        try:
            while True:
                await self._keep_alive()
                try:
                    entries = await self._transport.read(self.stream, last, 512, 1000)
                except TransportError as exc:  # lost connection, LOADING...: wait and retry
                    log.warning("reply stream read failed: %s", exc)
                    await anyio.sleep(0.2)
                    continue
                if not entries:
                    continue
                last = entries[-1].id
                for entry in entries:
                    self._deliver(entry.fields)
                try:
                    await self._transport.delete_entries(self.stream, [e.id for e in entries])
                except TransportError as exc:  # harmless: read past already, deleted on exit
                    log.debug("could not delete read replies: %s", exc)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self._transport.delete_keys(self.stream)
                except TransportError:
                    pass

    async def _keep_alive(self) -> None:
        """Refresh the stream's time to live (every quarter of it) while this node reads it."""
        now = anyio.current_time()
        if now < self._refresh_at:
            return
        try:
            await self._transport.expire(self.stream, self.ttl_ms)
        except TransportError as exc:  # tried again on the next pass
            log.debug("could not refresh the reply stream's time to live: %s", exc)
            return
        self._refresh_at = now + self.ttl_ms / 4000

    def _deliver(self, fields: dict[bytes, bytes] | None) -> None:
        try:
            reply = codec.decode_reply(fields)
        except CodecError as exc:
            log.warning("dropping unreadable reply: %s", exc)
            return
        waiter = self._waiters.pop(reply.correlation_id, None)
        if waiter is None:
            return  # the caller gave up already
        waiter.reply = reply
        waiter.event.set()
