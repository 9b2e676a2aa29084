"""The dedup window's check of a batch: which deliveries repeat a message already handled."""

from __future__ import annotations

from collections.abc import Iterable

from .delivery import Delivery
from .transport import StreamTransport


async def split_duplicates(transport: StreamTransport, dedup_key: str, batch: list[Delivery],
                           running: Iterable[Delivery], now_ms: int
                           ) -> tuple[list[Delivery], list[Delivery]]:
    """``batch`` as (to run, duplicates): a delivery whose message id was seen within the
    window (the check records the others), or whose message runs now or earlier in the batch.

    :raises TransportError: the window could not be checked
    """
    known = [d for d in batch if d.envelope is not None]
    seen = await transport.dedup_seen(dedup_key, [d.envelope.id for d in known  # type: ignore[union-attr]
                                                  ], now_ms)
    # Copies arriving together (one read, or while the first copy still runs) are not in the
    # window yet: only the first runs. The caller must not await until they are in flight.
    ids = {d.envelope.id for d in running if d.envelope is not None}
    duplicates = set()
    for delivery, was in zip(known, seen):
        message_id = delivery.envelope.id  # type: ignore[union-attr]
        if was or message_id in ids:
            duplicates.add(id(delivery))
        else:
            ids.add(message_id)
    if not duplicates:
        return batch, []
    return ([d for d in batch if id(d) not in duplicates],
            [d for d in batch if id(d) in duplicates])
