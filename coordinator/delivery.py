"""One entry on its way through a consumer, and what a consumer tells its handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from .envelope import Envelope
from .errors import CodecError, LeaseLost
from .keys import StreamKeys
from .transport import Entry


class StreamSpec(NamedTuple):
    """Which stream a consumer reads, as which group and consumer."""

    keys: StreamKeys
    group: str
    consumer: str


class Delivery:
    """An entry handed to a handler; ``envelope`` is None for a poison entry."""

    __slots__ = ("entry", "envelope", "deliveries", "received_ms", "leased_ms", "lost", "error")

    def __init__(self, entry: Entry, envelope: Envelope | None, deliveries: int, now_ms: int,
                 error: CodecError | None = None) -> None:
        self.entry = entry
        self.envelope = envelope
        self.deliveries = deliveries
        self.received_ms = now_ms
        self.leased_ms = now_ms
        self.lost = False
        self.error = error

    @property
    def entry_id(self) -> bytes:
        """The stream id of the entry."""
        return self.entry.id

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if another replica took this entry over.

        Long handlers may call this between steps to stop work that is no longer theirs.
        """
        if self.lost:
            raise LeaseLost(f"entry {self.entry.id.decode()} was taken over by another consumer")


EntryHandler = Callable[[Delivery], Awaitable[None]]


def log_ids(spec: StreamSpec, delivery: Delivery) -> dict[str, object]:
    """The ids that identify a delivery in log records (``extra``)."""
    envelope = delivery.envelope
    return {"stream": spec.keys.stream, "entry_id": delivery.entry.id.decode(),
            "message_id": envelope.id if envelope else None, "consumer": spec.consumer}


class ConsumerStats:
    """Counters of one consumer, read by metrics and tests."""

    __slots__ = ("delivered", "acked", "retried", "dead_lettered", "poison", "duplicates",
                 "leases_renewed", "leases_lost", "reclaimed", "refused_acks")

    def __init__(self) -> None:
        self.delivered = 0
        self.acked = 0
        self.retried = 0
        self.dead_lettered = 0
        self.poison = 0
        self.duplicates = 0
        self.leases_renewed = 0
        self.leases_lost = 0
        self.reclaimed = 0
        self.refused_acks = 0

    def as_dict(self) -> dict[str, int]:
        """All counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}
