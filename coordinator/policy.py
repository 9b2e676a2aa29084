"""Delivery decisions as plain functions: no Redis, no event loop, easy to test."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import NamedTuple


def retry_delay_ms(deliveries: int, base_ms: int, max_ms: int,
                   rng: random.Random | None = None) -> int:
    """Exponential backoff with full jitter: uniform in [ceiling/2, ceiling].

    ``deliveries`` is Redis's counter after the failed attempt (1 for the first failure), so the
    ceiling is ``base * 2**(deliveries-1)`` capped at ``max_ms``. Half the ceiling is kept as a
    floor so a retry storm still spreads out but never fires at once.
    """
    ceiling = min(max_ms, base_ms * (1 << min(max(deliveries - 1, 0), 30)))
    low = ceiling // 2
    return int((rng or random).uniform(low, ceiling))


def should_dead_letter(deliveries: int, max_deliveries: int) -> bool:
    """True once an entry has been delivered ``max_deliveries`` times and failed again."""
    return deliveries >= max_deliveries


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream id ``ms-seq`` as a comparable tuple."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(ms: int, seq: int) -> bytes:
    """A stream id from its parts."""
    return f"{ms}-{seq}".encode()


class GroupProgress(NamedTuple):
    """How far one group got: its oldest unacknowledged id (if any) and its read position."""

    oldest_pending: bytes | None
    last_delivered: bytes


def ack_floor(group: GroupProgress) -> tuple[int, int]:
    """The first id the group may still need: everything strictly below it is acknowledged."""
    if group.oldest_pending is not None:
        return parse_id(group.oldest_pending)
    ms, seq = parse_id(group.last_delivered)
    return ms, seq + 1


def trim_floor(groups: Iterable[GroupProgress], now_ms: int, retention_ms: int) -> bytes | None:
    """The MINID to trim a stream to, or None when nothing may be trimmed.

    Never above what every group acknowledged, never above ``now - retention``. A stream
    without groups is never trimmed: its entries wait for an agent that has not started yet.
    """
    floors = [ack_floor(g) for g in groups]
    if not floors:
        return None
    by_age = (max(now_ms - retention_ms, 0), 0)
    floor = min(min(floors), by_age)
    if floor <= (0, 1):
        return None
    return format_id(*floor)


def is_expired(deadline_ms: int | None, now_ms: int) -> bool:
    """True when a message carries a deadline that has passed."""
    return deadline_ms is not None and now_ms >= deadline_ms
