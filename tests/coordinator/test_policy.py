import random

from coordinator.policy import (GroupProgress, is_expired, parse_id, retry_delay_ms,
                                should_dead_letter, trim_floor)


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    ceilings = [retry_delay_ms(n, 100, 1_000, rng) for n in range(1, 8)]
    assert 50 <= ceilings[0] <= 100
    assert 100 <= ceilings[1] <= 200
    assert all(500 <= c <= 1_000 for c in ceilings[4:])


def test_dead_letter_after_max_deliveries() -> None:
    assert not should_dead_letter(2, 3)
    assert should_dead_letter(3, 3)


def test_trim_floor_never_passes_oldest_pending() -> None:
    groups = [GroupProgress(b"100-5", b"200-0"), GroupProgress(None, b"150-0")]
    assert trim_floor(groups, now_ms=10_000, retention_ms=0) == b"100-5"


def test_trim_floor_respects_retention_age() -> None:
    groups = [GroupProgress(None, b"9000-0")]
    assert trim_floor(groups, now_ms=10_000, retention_ms=5_000) == b"5000-0"


def test_trim_floor_after_everything_acked_keeps_nothing_unacked() -> None:
    groups = [GroupProgress(None, b"300-2")]
    assert trim_floor(groups, now_ms=10_000, retention_ms=0) == b"300-3"


def test_stream_without_groups_is_never_trimmed() -> None:
    assert trim_floor([], now_ms=10_000, retention_ms=0) is None


def test_ids_and_deadlines() -> None:
    assert parse_id(b"12-3") == (12, 3)
    assert is_expired(5, 5) and not is_expired(None, 5) and not is_expired(6, 5)
